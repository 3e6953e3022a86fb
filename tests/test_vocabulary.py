import pytest
import torch

from model.vocabulary import EmptyVocabulary, TextEncoder, Vocabulary


def test_vocabulary_from_labels_keeps_order_and_prompts():
    vocabulary = Vocabulary.from_labels(["car", "sky", "car"], {"car": ["auto"]})
    assert vocabulary.labels == ("car", "sky")
    assert vocabulary.texts == (("car", "auto"), ("sky",))
    assert vocabulary.key != Vocabulary.from_labels(["car", "sky"]).key
    with pytest.raises(EmptyVocabulary):
        Vocabulary.from_labels([])


def test_other_things_are_classified_after_the_labels_and_never_served():
    plain = Vocabulary.from_labels(["car", "sky"])
    vocabulary = Vocabulary.from_labels(["car", "sky"], {"car": ["auto"]}, others=["road", "car", "tree", "road"])
    assert vocabulary.labels == ("car", "sky", "road", "tree") and vocabulary.others == 2  # "car" is a label
    assert vocabulary.served == ("car", "sky") and vocabulary.texts[2:] == (("road",), ("tree",))
    assert plain.served == plain.labels and plain.others == 0
    # A config without other things keeps its key (a project's model_version must not change); with, it changes.
    assert plain.key == Vocabulary(("car", "sky"), (("car",), ("sky",))).key
    assert Vocabulary.from_labels(["car", "sky", "road", "tree"]).key != Vocabulary.from_labels(
        ["car", "sky"], others=["road", "tree"]).key
    # Two tags' vocabularies: every label first, then the other things no tag has as a label.
    merged = Vocabulary.merge([vocabulary, Vocabulary.from_labels(["tree"], others=["sky", "grass"])])
    assert merged.served == ("car", "sky", "tree") and merged.labels[3:] == ("road", "grass") and merged.others == 2
    with pytest.raises(EmptyVocabulary):
        Vocabulary(("road",), others=1)


def test_text_embeddings_are_cached_in_memory_and_on_disk(demo_clip, tmp_path):
    vocabulary = Vocabulary.from_labels(["car", "grass", "sky"])
    encoder = TextEncoder(demo_clip, cache_dir=tmp_path)
    first = encoder.embed(vocabulary)
    assert encoder.forward_count == 1 and first.shape == (3, 128)
    assert torch.allclose(first.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(encoder.embed(vocabulary), first)
    assert encoder.forward_count == 1  # warm: no text-tower forward
    restarted = TextEncoder(demo_clip, cache_dir=tmp_path)
    assert torch.equal(restarted.embed(vocabulary), first) and restarted.forward_count == 0


def test_prompt_texts_change_the_class_embedding(demo_clip):
    encoder = TextEncoder(demo_clip)
    plain = encoder.embed(Vocabulary.from_labels(["car"]))
    with_prompt = encoder.embed(Vocabulary.from_labels(["car"], {"car": ["motorcar"]}))
    assert not torch.allclose(plain, with_prompt)
