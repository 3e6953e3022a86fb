"""WordNet access through NLTK, built from Debian's ``wordnet-base`` offline.

NLTK's downloader needs the internet; Debian ships the same Princeton WordNet 3.0
under ``/usr/share/wordnet``. NLTK refuses corpus paths outside its data
directories (symlinks included) and needs a ``lexnames`` file Debian only ships as
a man page, so :func:`ensure_wordnet` copies the files into ``<nltk_data>/corpora/wordnet``
and writes ``lexnames`` from the man page.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path

DEBIAN_WORDNET_DIR = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))
LEXNAMES_MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")
DEFAULT_NLTK_DATA = Path(os.environ.get("NLTK_DATA", Path.home() / ".cache" / "gkc" / "nltk_data"))
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


class WordNetMissing(RuntimeError):
    pass


def _lexnames_from_man_page(man_page: Path) -> str:
    lines = []
    with gzip.open(man_page, "rt") as file:
        text = file.read()
    for line in text.splitlines():
        match = re.match(r"^(\d\d)\t(\w+)\.(\w+)", line)
        if match:
            number, pos, name = match.groups()
            lines.append(f"{number}\t{pos}.{name}\t{_POS_NUMBER[pos]}")
    if len(lines) != 45:
        raise WordNetMissing(f"expected 45 lexicographer files in {man_page}, found {len(lines)}")
    return "\n".join(lines) + "\n"


def ensure_wordnet(nltk_data: Path = DEFAULT_NLTK_DATA) -> Path:
    """Make ``<nltk_data>/corpora/wordnet`` complete and put it on NLTK's path.

    Returns:
        The ``nltk_data`` directory used.
    """
    import nltk

    target = Path(nltk_data) / "corpora" / "wordnet"
    if not (target / "lexnames").exists():
        if not (DEBIAN_WORDNET_DIR / "data.noun").exists():
            raise WordNetMissing(
                f"WordNet not found in {DEBIAN_WORDNET_DIR}: install Debian's packages "
                "'wordnet-base wordnet-sense-index' (apt-get install -y wordnet-base wordnet-sense-index)"
                " or set WORDNET_DIR to a WordNet 3.0 dict directory"
            )
        staging = target.with_name("wordnet.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for source in DEBIAN_WORDNET_DIR.iterdir():
            if source.is_file():
                shutil.copyfile(source, staging / source.name)
        (staging / "lexnames").write_text(_lexnames_from_man_page(LEXNAMES_MAN_PAGE))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    if str(nltk_data) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data))
    return Path(nltk_data)


def wordnet():
    """The NLTK WordNet corpus reader, set up from the local files."""
    ensure_wordnet()
    from nltk.corpus import wordnet as wn

    return wn


def lemma_names(synset_name: str) -> list[str]:
    """Human-readable lemma names of one synset (``'car.n.01'`` → ``['car', 'auto', ...]``)."""
    names = [name.replace("_", " ") for name in wordnet().synset(synset_name).lemma_names()]
    return list(dict.fromkeys(names))


def noun_synonyms(word: str, max_synsets: int = 3) -> list[str]:
    """Lemma names of the first noun senses of ``word``, the word itself first.

    Several senses are kept on purpose: which of them fits an image region is
    decided later by the frozen CLIP (text diversification's image-aware filter).
    """
    wn = wordnet()
    key = word.strip().lower().replace(" ", "_")
    names = [word.strip()]
    for synset in wn.synsets(key, pos=wn.NOUN)[:max_synsets]:
        names.extend(name.replace("_", " ") for name in synset.lemma_names())
    first_by_lower: dict[str, str] = {}
    for name in names:
        first_by_lower.setdefault(name.lower(), name)
    return list(first_by_lower.values())
