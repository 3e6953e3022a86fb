import pytest

from backend.label_config import LabelConfigError, has_smart_tools, parse_targets
from model.config import RegionRules


def test_brush_and_polygon_targets_with_prompts_and_thresholds():
    config = """<View><Image name="img" value="$photo"/>
      <BrushLabels name="mask" toName="img" model_score_threshold="0.4" model_min_region_area="0.05"
                   model_background="road, building,, sky">
        <Label value="car" predicted_values="automobile, auto"/><Label value="sky"/></BrushLabels>
      <PolygonLabels name="poly" toName="img"><Label value="tree"/></PolygonLabels>
      <Choices name="c" toName="img"><Choice value="x"/></Choices></View>"""
    brush, polygon = parse_targets(config)
    assert (brush.control, brush.tag, brush.image, brush.data_key) == ("mask", "BrushLabels", "img", "photo")
    assert brush.vocabulary.served == ("car", "sky")  # "sky" is a label: not another thing
    assert brush.vocabulary.labels == ("car", "sky", "road", "building") and brush.vocabulary.others == 2
    assert brush.vocabulary.texts[0] == ("car", "automobile", "auto")
    assert brush.score_threshold == 0.4
    assert polygon.tag == "PolygonLabels" and polygon.vocabulary.labels == ("tree",) and not polygon.vocabulary.others
    defaults = RegionRules(min_score=0.25, min_area=0.01)
    assert brush.rules(defaults) == RegionRules(min_score=0.4, min_area=0.05)  # the tag's own attributes win
    assert polygon.rules(defaults) == defaults  # none set: the backend's MIN_REGION_SCORE / MIN_REGION_AREA


@pytest.mark.parametrize("config, message", [
    ('<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>',
     "no BrushLabels or PolygonLabels"),
    ('<View><Image name="i" value="$image"/><BrushLabels name="m" toName="i"></BrushLabels></View>',
     "vocabulary is empty"),
    ('<View><Image name="i" value="$image"/><BrushLabels name="m" toName="i" model_score_threshold="high">'
     '<Label value="a"/></BrushLabels></View>', 'model_score_threshold="high" on <BrushLabels name="m"> is not a number'),
    ('<View><Image name="i" value="$image"/><PolygonLabels name="p" toName="i" model_min_region_area="5%">'
     '<Label value="a"/></PolygonLabels></View>', 'model_min_region_area="5%" on <PolygonLabels name="p"> is not a'),
    ('<View><Image name="i" value="$image"/><BrushLabels name="m" toName="i" model_min_region_area="2">'
     '<Label value="a"/></BrushLabels></View>', 'model_min_region_area="2" on <BrushLabels name="m"> must be between'),
    ("<View><Image", "can't be parsed"),
    ("", "empty"),
])
def test_unservable_configs_say_why(config, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_targets(config)


def _config(labels: int = 3, tags: int = 1, padding: int = 0, background: int = 0) -> str:
    others = f' model_background="{",".join(f"o{n}" for n in range(background))}"' if background else ""
    body = "".join(f'<BrushLabels name="m{t}" toName="i"{others}>' + "".join(f'<Label value="l{t}-{n}"/>' for n in range(labels))
                   + "</BrushLabels>" for t in range(tags))
    return f'<View><Image name="i" value="$image"/>{body}<!-- {"x" * padding} --></View>'


@pytest.mark.parametrize("config, message", [
    (_config(labels=1001), "has 1001 labels; at most 1000"),
    (_config(labels=999, background=2), "has 999 labels and 2 model_background names; at most 1000"),
    (_config(tags=17), "more than 16 segmentation tags"),
    (_config(padding=600_000), "at most 524288 are served"),
])
def test_configs_are_bounded_before_their_work(config, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_targets(config)
    assert len(parse_targets(_config(labels=1000, tags=16))) == 16  # the bounds themselves are served


@pytest.mark.parametrize("tool, smart", [
    ("", False),
    ('<KeyPointLabels name="k" toName="i"><Label value="l0-0"/></KeyPointLabels>', True),  # Label Studio's default
    ('<RectangleLabels name="r" toName="i" smart="true" smartOnly="true"><Label value="l0-0"/></RectangleLabels>', True),
    ('<KeyPointLabels name="k" toName="i" smart="false"><Label value="l0-0"/></KeyPointLabels>', False),
    ('<Choices name="c" toName="i"><Choice value="x"/></Choices>', False),
])
def test_an_opened_task_keeps_its_pass_only_where_the_config_clicks(tool, smart):
    assert has_smart_tools(_config().replace("<!--", tool + "<!--")) is smart
