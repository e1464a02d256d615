import json
import shutil

import pytest

from prunekit.data import corpora
from prunekit.data.corpora import EVALUATION_FRACTION, PYDOCS_ROOT, load_corpus
from prunekit.errors import PrunekitError

needs_kjv = pytest.mark.skipif(shutil.which("bible") is None, reason="Debian bible-kjv not installed (make corpora)")
needs_pydocs = pytest.mark.skipif(not PYDOCS_ROOT.is_dir(), reason="Debian python3.11-doc not installed (make corpora)")


def _assert_disjoint_cover(source):
    calibration, evaluation, whole = (load_corpus(source, split) for split in ("calibration", "evaluation", "all"))
    assert calibration.records and evaluation.records
    assert not set(calibration.records) & set(evaluation.records)
    assert sorted(calibration.records + evaluation.records) == sorted(whole.records)
    return calibration, evaluation


def test_bundled_sample_is_large_enough_and_split():
    calibration, evaluation = _assert_disjoint_cover("sample")
    assert len(load_corpus("sample", "all").text.encode()) >= 100_000
    share = len(evaluation.text) / (len(evaluation.text) + len(calibration.text))
    assert EVALUATION_FRACTION <= share < EVALUATION_FRACTION + 0.05


def test_text_file_paragraphs_and_tail_split(tmp_path):
    path = tmp_path / "notes.txt"
    text = "\n\n".join(f"paragraph {i} " + "word " * 20 for i in range(20)) + "\n"
    path.write_text(text)
    calibration, evaluation = (load_corpus(path, split) for split in ("calibration", "evaluation"))
    assert not set(calibration.records) & set(evaluation.records)
    assert len(calibration.records) + len(evaluation.records) == 20
    assert evaluation.records[-1].startswith("paragraph 19")
    assert calibration.name == "notes.txt"
    assert load_corpus(path, "all").text == text  # the whole file is used verbatim


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"record {i}", "id": i}) for i in range(8)) + "\n")
    assert load_corpus(path, "all").records == [f"record {i}" for i in range(8)]


@pytest.mark.parametrize(
    "content,pattern",
    [
        ('{"text": "ok"}\nnot json\n', "line 2 is not a JSON object with a 'text' field"),
        ('{"body": "no text field"}\n', "line 1"),
    ],
)
def test_bad_jsonl(tmp_path, content, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PrunekitError, match=pattern):
        load_corpus(path, "all")


def test_unknown_corpus_and_split(tmp_path):
    with pytest.raises(PrunekitError, match="unknown corpus 'nope'.*sample, kjv, pydocs"):
        load_corpus("nope")
    with pytest.raises(PrunekitError, match="unknown split"):
        load_corpus("sample", "train")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(PrunekitError, match="not UTF-8"):
        load_corpus(binary, "all")


def test_hf_dataset_offline_says_how_to_supply_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(PrunekitError, match="local .txt or .jsonl"):
        load_corpus("wikitext2", "evaluation")


@needs_kjv
def test_kjv_excludes_sample_books_and_splits_testaments():
    calibration, evaluation = _assert_disjoint_cover("kjv")
    sample = set(load_corpus("sample", "all").records)
    assert not sample & set(load_corpus("kjv", "all").records)
    assert calibration.records[0].startswith("In the beginning God created")
    assert evaluation.records[0].startswith("The book of the generation of Jesus Christ")


@needs_pydocs
def test_pydocs_library_is_evaluation():
    calibration, evaluation = _assert_disjoint_cover("pydocs")
    assert len(evaluation.records) > 100 and len(calibration.records) > 100


def test_missing_debian_corpora_name_the_install_command(monkeypatch, tmp_path):
    from prunekit.data import corpora

    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    monkeypatch.setattr(corpora, "PYDOCS_ROOT", tmp_path / "absent")
    with pytest.raises(PrunekitError, match="apt-get install bible-kjv"):
        load_corpus("kjv")
    with pytest.raises(PrunekitError, match="apt-get install python3.11-doc"):
        load_corpus("pydocs")
    monkeypatch.setattr(corpora, "FORTUNES_ROOT", tmp_path / "absent")
    monkeypatch.setattr(corpora, "JARGON_FILE", tmp_path / "absent.gz")
    with pytest.raises(PrunekitError, match="apt-get install fortunes"):
        load_corpus("fortunes")
    with pytest.raises(PrunekitError, match="apt-get install jargon-text"):
        load_corpus("jargon")
    with pytest.raises(PrunekitError, match="apt-get install"):
        load_corpus("mix")


needs_mix = pytest.mark.skipif(not (corpora.FORTUNES_ROOT.is_dir() and corpora.JARGON_FILE.is_file()
                                    and corpora.PYDOCS_ROOT.is_dir() and shutil.which("bible")),
                               reason="Debian corpora missing (make corpora)")


@needs_mix
def test_fortunes_and_jargon_are_split_without_shared_text():
    for name in ("fortunes", "jargon"):
        calibration, evaluation = _assert_disjoint_cover(name)
        assert len(evaluation.records) > 1000 and not set(calibration.records) & set(evaluation.records)
    assert not any(record.startswith(" ") for record in load_corpus("jargon", "evaluation").records[:50])


@needs_mix
def test_mix_is_every_offline_corpus_and_keeps_their_splits():
    for split in ("calibration", "evaluation"):
        mixed = load_corpus("mix", split).records
        members = [record for name in corpora.MIX for record in load_corpus(name, split).records]
        assert mixed == members
    # The held-out kind is in no split of the mix; two one-word paragraphs ('Yow!', 'TANSTAAFL') are also cookies.
    jargon = load_corpus("jargon", "all").records
    shared = set(jargon) & set(load_corpus("mix", "all").records)
    assert sum(map(len, shared)) < 1e-4 * sum(map(len, jargon))
