"""The bad-input corpus: every case ends with exit status != 0, exactly one line on stderr naming the
file and the field, and the project folder exactly as it was (no file written, changed or deleted).

Each case copies a small built project (tiny GPT-2, statistics, a delta), breaks one thing, runs one
`romeflow` command in it (from its root, with ``--params params.yaml``) and compares a snapshot of
every file (bytes and mode) before and after. Classes: manifests, params, deltas, statistics files,
CLI paths and names, outputs, faults.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import stat
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from romeflow import safeyaml
from romeflow.cli import main
from romeflow.pipeline.deltas import tensors_sha256
from romeflow.pipeline.registry import read_manifests, register, unregister
from romeflow.engine.statistics import tensor_sha256

from test_workflow import make_project

CURIE = """edits:
  - subject: Pierre Curie
    relation: "{} worked in the field of"
    target: medicine
    target_true: physics
    neighbors: ["Albert Einstein worked in the field of"]
"""

BOMB = """edits:
  - subject: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    relation: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    target: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    target_true: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    paraphrases: [*d,*d,*d,*d,*d,*d,*d,*d,*d]
"""


def cli(root: Path, *args):
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return CliRunner().invoke(main, ["--params", "params.yaml", "--cache", "cache", *args])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_dir):
    """edits/{a,b,curie}.yaml, stats/layer1.safetensors, deltas/{a,curie}.safetensors, manifests [a, b]."""
    root = make_project(tmp_path_factory.mktemp("bad-inputs"), model_dir, manifests=("a", "b"))
    (root / "edits" / "curie.yaml").write_text(CURIE)
    r = cli(root, "stats", "--out", "stats/layer1.safetensors")
    assert r.exit_code == 0, r.output
    for name in ("a", "curie"):
        r = cli(root, "apply", f"edits/{name}.yaml", "--stats", "stats/layer1.safetensors")
        assert r.exit_code == 0, r.output
    (root / "outside").mkdir()
    (root / "outside" / "victim.txt").write_text("must survive\n")
    (root / "afile").write_text("a file, not a folder\n")
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry's kind and mode, with a file's sha256 and a link's target; FIFOs, sockets and devices
    are never opened (reading a FIFO would block)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel, st = str(p.relative_to(root)), p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", st.st_mode)
        elif stat.S_ISREG(st.st_mode):
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode)
        else:
            out[rel] = ("special", st.st_mode, st.st_rdev)
    return out


# --------------------------------------------------------------------------------------------------
# Ways to break a project
# --------------------------------------------------------------------------------------------------


def write(rel: str, text: str | bytes):
    def setup(root: Path):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def params_edit(old: str, new: str):
    def setup(root: Path):
        p = root / "params.yaml"
        text = p.read_text()
        assert old in text, old
        p.write_text(text.replace(old, new, 1))
    return setup


def params_append(text: str):
    def setup(root: Path):
        with open(root / "params.yaml", "a") as f:
            f.write(text)
    return setup


def manifest(body: str, name: str = "bad"):
    return write(f"edits/{name}.yaml", body)


def edit_field(field: str, value: str):
    """CURIE with one field's line replaced (or added)."""
    lines = [l for l in CURIE.splitlines() if not l.strip().startswith(f"{field}:")]
    lines.insert(2, f"    {field}: {value}")
    return manifest("\n".join(lines) + "\n")


def read_delta(path: Path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["romeflow"])


def delta(change, rehash: bool = True, src: str = "deltas/curie.safetensors", dst: str = "deltas/bad.safetensors",
          meta_text=None):
    """A copy of a good delta with its tensors / metadata changed by ``change(tensors, meta)``; the
    content hash recomputed (``rehash``) so that the check under test is the one that fires."""
    def setup(root: Path):
        tensors, meta = read_delta(root / src)
        change(tensors, meta)
        if rehash:
            meta["tensors_sha256"] = tensors_sha256(tensors, len(meta["edits"]))
        header = {"romeflow": meta_text if meta_text is not None else json.dumps(meta)}
        save_file(tensors, root / dst, metadata=header)
    return setup


def set_tensor(name, fn):
    def change(t, m):
        t[name] = fn(t[name])
    return change


def stats(change, rehash: bool = True, dst: str = "stats/bad.safetensors"):
    def setup(root: Path):
        with safe_open(root / "stats/layer1.safetensors", framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(f.metadata()["romeflow"])
        change(t, meta)
        if rehash and "second_moment" in t:
            meta["tensor_sha256"] = tensor_sha256(t["second_moment"])
        save_file(t, root / dst, metadata={"romeflow": json.dumps(meta)})
    return setup


def both(*setups):
    def setup(root: Path):
        for s in setups:
            s(root)
    return setup


def symlink(rel: str, target: str):
    def setup(root: Path):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).unlink(missing_ok=True)
        (root / rel).symlink_to(target)
    return setup


def special(rel: str, kind: str):
    """A FIFO, a character device (the null device, as `mknod F c 1 3` makes it) or a Unix socket at ``rel``."""
    def setup(root: Path):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(p)
        elif kind == "chr":
            try:
                os.mknod(p, stat.S_IFCHR | 0o644, os.makedev(1, 3))
            except PermissionError:
                pytest.skip("mknod needs CAP_MKNOD")
        else:
            with contextlib.chdir(root), socket.socket(socket.AF_UNIX) as s:
                s.bind(rel)  # relative: a socket's path is limited to ~100 bytes
    return setup


def strip_pairs(t, m):
    """A delta as written before k*/v* were stored: factors only."""
    for k in [k for k in t if k.endswith((".k_star", ".v_star", ".protected"))]:
        del t[k]
    m.pop("key_values", None)
    for e in m["edits"]:
        e.pop("protected_keys", None)


JOINT = "  window: 64\n  method: joint"
A_CONFLICT = """edits:
  - subject: Pierre Curie
    relation: "{} worked in the field of"
    target: law
"""

APPLY_BAD = ("apply", "edits/bad.yaml", "--stats", "stats/layer1.safetensors", "--out", "new.safetensors")
APPLY = ("apply", "edits/curie.yaml", "--stats", "stats/layer1.safetensors", "--out", "new.safetensors")
GEN_BAD = ("generate", "Pierre Curie", "--delta", "deltas/bad.safetensors")
LONG = "x" * 201

# (id, setup, argv, every string the one line must contain)
CASES = [
    # ---- manifests ------------------------------------------------------------------------------
    ("manifest-alias-bomb", manifest(BOMB), APPLY_BAD, ["edits/bad.yaml: edits[0].subject: anchors (&a) are not allowed"]),
    ("manifest-alias-bomb-add", manifest(BOMB), ("add", "edits/bad.yaml"), ["edits/bad.yaml: edits[0].subject: anchors"]),
    ("manifest-anchor-in-target", manifest(CURIE.replace("target: medicine", "target: &t medicine")), APPLY_BAD,
     ["edits/bad.yaml: edits[0].target: anchors (&t)"]),
    ("manifest-duplicate-key", manifest(CURIE.replace("target: medicine", "target: medicine\n    target: law")),
     APPLY_BAD, ["edits/bad.yaml: edits[0].target: duplicate key"]),
    ("manifest-duplicate-section", manifest(CURIE + CURIE), APPLY_BAD, ["edits/bad.yaml: edits: duplicate key"]),
    ("manifest-merge-key", manifest("edits:\n  - <<: {subject: x}\n    relation: '{} is'\n    target: y\n"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].<<: merge keys"]),
    ("manifest-long-target", edit_field("target", LONG), APPLY_BAD,
     ["edits/bad.yaml: edits[0].target: is 201 characters long, more than the 200 allowed"]),
    ("manifest-long-subject", manifest(CURIE.replace("subject: Pierre Curie", f"subject: {LONG}")), APPLY_BAD,
     ["edits/bad.yaml: edits[0].subject: is 201 characters long"]),
    ("manifest-long-relation", edit_field("relation", "'{} " + "y" * 1000 + "'"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].relation: is 1003 characters long, more than the 1000 allowed"]),
    ("manifest-long-paraphrase", edit_field("paraphrases", "['Pierre Curie " + "z" * 1000 + "']"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].paraphrases[0]: is 1013 characters long"]),
    ("manifest-long-neighbor", edit_field("neighbors", "['" + "n" * 1001 + "']"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].neighbors[0]: is 1001 characters long"]),
    ("manifest-long-answer", edit_field("neighbors", "[{prompt: 'A is', answer: " + LONG + "}]"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].neighbors[0].answer: is 201 characters long"]),
    ("manifest-huge-string", edit_field("target_true", "w" * 20000), APPLY_BAD,
     ["edits/bad.yaml: edits[0].target_true: value is 20000 characters long, more than the 10000 allowed"]),
    ("manifest-file-too-large", manifest(CURIE + "# " + "c" * (1 << 20) + "\n"), APPLY_BAD,
     ["edits/bad.yaml: (top level): file is larger than the 1048576 bytes allowed"]),
    ("manifest-too-deep", manifest("edits: " + "[" * 40 + "]" * 40 + "\n"), APPLY_BAD,
     ["edits/bad.yaml: edits", "nested deeper than 32 levels"]),
    ("manifest-empty-target", edit_field("target", "''"), APPLY_BAD, ["edits/bad.yaml: edits[0].target: must not be empty"]),
    ("manifest-missing-subject", manifest("edits:\n  - {relation: '{} is', target: x}\n"), APPLY_BAD,
     ["edits/bad.yaml: edits[0]: missing required field 'subject'"]),
    ("manifest-unknown-field", edit_field("colour", "red"), APPLY_BAD, ["edits/bad.yaml: edits[0]: unknown field 'colour'"]),
    ("manifest-relation-no-slot", edit_field("relation", "'worked in'"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].relation: must contain {}"]),
    ("manifest-relation-two-slots", edit_field("relation", "'{} and {}'"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].relation: must contain {} exactly once"]),
    ("manifest-target-is-true", edit_field("target", "physics"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].target: is the same as target_true"]),
    ("manifest-two-documents", manifest(CURIE + "---\n" + CURIE), APPLY_BAD, ["edits/bad.yaml: invalid YAML"]),
    ("manifest-invalid-yaml", manifest("edits: [\n"), APPLY_BAD, ["edits/bad.yaml: invalid YAML at line 2"]),
    ("manifest-not-utf8", manifest(b"edits:\n  - subject: \xff\xfe\n"), APPLY_BAD, ["edits/bad.yaml: invalid YAML"]),
    ("manifest-empty", manifest(""), APPLY_BAD, ["edits/bad.yaml: (top level): the manifest is empty"]),
    ("manifest-negative-layer", edit_field("layer", "-1"), APPLY_BAD, ["edits/bad.yaml: edits[0].layer: must be >= 0, got -1"]),
    ("manifest-layer-beyond-model", edit_field("layer", "7"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].layer: must be a layer of the model, 0 to 2, got 7"]),
    ("manifest-top-layer-beyond-model", manifest("layer: 5\n" + CURIE), APPLY_BAD,
     ["edits/bad.yaml: layer: must be a layer of the model, 0 to 2, got 5"]),
    ("manifest-edits-not-a-list", manifest("edits: {subject: x}\n"), APPLY_BAD, ["edits/bad.yaml: edits: must be a list"]),
    ("manifest-missing", None, ("apply", "edits/nope.yaml", "--out", "new.safetensors"),
     ["edits/nope.yaml: cannot read manifest"]),
    ("manifest-name-with-dot-add", manifest(CURIE, "a.b"), ("add", "edits/a.b.yaml"),
     ["edits/a.b.yaml: manifest name 'a.b' may only contain"]),
    ("manifest-add-outside-edits", write("elsewhere/c.yaml", CURIE), ("add", "elsewhere/c.yaml"),
     ["elsewhere/c.yaml: the pipeline reads manifests from edits/c.yaml"]),
    ("manifest-add-already-registered", None, ("add", "edits/a.yaml"), ["params.yaml: manifests: 'a' is already registered"]),

    # ---- params.yaml ----------------------------------------------------------------------------
    ("params-steps-negative", params_edit("  steps: 6", "  steps: -1"), APPLY, ["params.yaml: rome.steps: must be >= 1, got -1"]),
    ("params-lr-string", params_edit("  lr: 0.1", "  lr: abc"), APPLY, ["params.yaml: rome.lr: must be a number, got a string"]),
    ("params-lr-zero", params_edit("  lr: 0.1", "  lr: 0"), APPLY, ["params.yaml: rome.lr: must be > 0, got 0"]),
    ("params-lr-nan", params_edit("  lr: 0.1", "  lr: .nan"), APPLY, ["params.yaml: rome.lr: must be a finite number"]),
    ("params-protect-source-missing", params_edit("  lr: 0.1", "  lr: 0.1\n  protect_sources: [wikipedia, names.txt]"),
     APPLY, ["params.yaml: rome.protect_sources:", "names.txt: file not found"]),
    ("params-tokens-negative", params_edit("  tokens: 3000", "  tokens: -5"), ("stats", "--out", "s.safetensors"),
     ["params.yaml: stats.tokens: must be >= 1, got -5"]),
    ("params-seq-len-one", params_edit("  seq_len: 64", "  seq_len: 1"), ("stats",), ["params.yaml: stats.seq_len: must be >= 2, got 1"]),
    ("params-layer-word", params_edit("  layer: 1", "  layer: one"), APPLY,
     ["params.yaml: rome.layer: must be an integer", "or 'auto' or 'default', got a string"]),
    ("params-layer-beyond-model", params_edit("  layer: 1", "  layer: 9"), ("stats", "--out", "s.safetensors"),
     ["params.yaml: rome.layer: must be a layer of the model, 0 to 2, got 9"]),
    ("params-layer-auto-untraced", params_edit("  layer: 1", "  layer: auto"), APPLY,
     ["params.yaml: rome.layer: auto:", "layer.json"]),
    ("params-layer-default-unmeasured-model", params_edit("  layer: 1", "  layer: default"), APPLY,
     ["params.yaml: rome.layer:", "has no measured default edit layer"]),
    ("params-duplicate-section", params_append("rome:\n  lr: 0.2\n"), APPLY, ["params.yaml: rome: duplicate key"]),
    ("params-duplicate-field", params_edit("  lr: 0.1", "  lr: 0.1\n  lr: 0.2"), APPLY, ["params.yaml: rome.lr: duplicate key"]),
    ("params-unknown-field", params_edit("  lr: 0.1", "  learning_rate: 0.1"), APPLY, ["params.yaml: rome.learning_rate: unknown field"]),
    ("params-unknown-section", params_append("romee:\n  lr: 0.2\n"), APPLY, ["params.yaml: romee: unknown field"]),
    ("params-alias", params_append("ft: &ft {lr: 0.1}\nftl: *ft\n"), APPLY, ["params.yaml: ft: anchors (&ft)"]),
    ("params-trace-samples-zero", params_append("trace:\n  samples: 0\n"), ("status",), ["params.yaml: trace.samples: must be >= 1, got 0"]),
    ("params-manifest-traversal", params_edit("  - a\n", "  - ../../outside/victim\n"), ("status",),
     ["params.yaml: manifests[0]: manifest name '../../outside/victim' may only contain"]),
    ("params-manifest-twice", params_edit("  - b\n", "  - a\n"), ("status",), ["params.yaml: manifests[1]: 'a' is listed twice"]),
    ("params-gate-unknown-metric", params_edit("    ES: 100", "    XS: 100"), ("status",), ["params.yaml: gate.eval.XS: unknown field"]),
    ("params-stack-window", params_edit("  window: 64", "  window: 1"), ("stack",), ["params.yaml: stack.window: must be >= 2, got 1"]),
    ("params-ftl-linf-negative", params_append("ftl:\n  linf: -1\n"), ("bench", "zsre", "--records", "r.json"),
     ["params.yaml: ftl.linf: must be > 0, got -1"]),
    ("params-ft-linf", params_append("ft:\n  linf: 0.1\n"), ("status",), ["params.yaml: ft.linf: belongs to ftl"]),
    ("params-kn-threshold", params_append("kn:\n  threshold: 2\n"), ("status",), ["params.yaml: kn.threshold: must be <= 1, got 2"]),
    ("params-eval-token-neighbors-negative", params_edit("  token_neighbors: 3", "  token_neighbors: -1"), ("status",),
     ["params.yaml: eval.token_neighbors: must be >= 0, got -1"]),
    ("params-eval-token-neighbors-huge", params_edit("  token_neighbors: 3", "  token_neighbors: 100000"),
     ("eval", "edits/a.yaml"), ["params.yaml: eval.token_neighbors: must be <= 256, got 100000"]),
    ("eval-protect-source-missing", params_edit("  lr: 0.1", "  lr: 0.1\n  protect_sources: [names.txt]"),
     ("eval", "edits/a.yaml"), ["params.yaml: rome.protect_sources:", "names.txt: file not found"]),
    ("params-generation-template", params_append("bench:\n  generation:\n    templates: [abc]\n"), ("status",),
     ["params.yaml: bench.generation.templates[0]: must contain {}"]),
    ("params-prefix-starts-empty", params_edit("  lr: 0.1", "  lr: 0.1\n  prefix_starts: []"), APPLY,
     ["params.yaml: rome.prefix_starts: must not be empty"]),
    ("params-essence-prompt", params_edit("  lr: 0.1", "  lr: 0.1\n  essence_prompt: 'a {} {}'"), APPLY,
     ["params.yaml: rome.essence_prompt: must contain {} exactly once"]),
    ("params-seed-negative", params_edit("  lr: 0.1", "  lr: 0.1\n  seed: -3"), APPLY, ["params.yaml: rome.seed: must be >= 0, got -3"]),
    ("params-steps-float", params_edit("  steps: 6", "  steps: 2.5"), APPLY, ["params.yaml: rome.steps: must be an integer, got 2.5"]),
    ("params-model-number", params_edit("model: ", "model: 3\n#"), APPLY, ["params.yaml: model: must be a string or a mapping, got 3"]),
    # ---- model: placement (device, dtype, device_map) -----------------------------------------
    ("params-model-device-unknown", params_edit("model: ", "model:\n  device: gpu\n  name: "), APPLY,
     ["params.yaml: model.device: must be auto, cpu, mps, cuda or cuda:N, got a string"]),
    ("params-model-dtype-unknown", params_edit("model: ", "model:\n  dtype: float8\n  name: "), APPLY,
     ["params.yaml: model.dtype: must be"]),
    ("params-model-unknown-field", params_edit("model: ", "model:\n  precision: half\n  name: "), APPLY,
     ["params.yaml: model.precision: unknown field"]),
    ("params-model-no-name", params_edit("model: ", "model:\n  dtype: float32\n#"), APPLY,
     ["params.yaml: model", "name"]),
    ("params-model-device-absent", params_edit("model: ", "model:\n  device: cuda:99\n  name: "), APPLY,
     ["params.yaml: model.device: "]),
    ("params-model-device-map-strategy", params_edit("model: ", "model:\n  device_map: everywhere\n  name: "), APPLY,
     ["params.yaml: model.device_map: must be"]),
    ("params-model-disk-without-folder", params_edit("model: ", "model:\n  device_map: {'': disk}\n  name: "), APPLY,
     ["params.yaml: model.offload_folder: required when device_map puts modules on disk"]),
    ("params-model-device-with-map", params_edit("model: ", "model:\n  device_map: auto\n  device: cpu\n  name: "),
     APPLY, ["params.yaml: model.device: must be auto (or left out) with a device_map"]),
    ("params-model-max-memory-alone", params_edit("model: ", "model:\n  max_memory: {cpu: 1GiB}\n  name: "), APPLY,
     ["params.yaml: model.max_memory: needs a device_map"]),
    ("params-model-max-memory-bad", params_edit("model: ", "model:\n  device_map: auto\n  max_memory: {cpu: lots}\n  name: "),
     APPLY, ["params.yaml: model.max_memory"]),
    ("cli-device-unknown", None, ("--device", "gpu", "status"), ["Invalid value for '--device'"]),
    ("cli-dtype-unknown", None, ("--dtype", "float8", "status"), ["Invalid value for '--dtype'"]),
    ("cli-device-absent", None, ("--device", "cuda:99") + APPLY, ["--device: cuda:99"]),
    ("params-not-a-mapping", write("params.yaml", "- a\n- b\n"), APPLY, ["params.yaml: (top level): must be a mapping"]),
    ("params-too-large", params_append("# " + "p" * (1 << 20) + "\n"), APPLY, ["params.yaml: (top level): file is larger"]),
    ("params-protect-sources-empty", params_edit("  lr: 0.1", "  lr: 0.1\n  protect_sources: []"), APPLY,
     ["params.yaml: rome.protect_sources: must not be empty"]),
    ("params-insert-unknown", params_edit("  lr: 0.1", "  lr: 0.1\n  insert: gated2"), APPLY,
     ["params.yaml: rome.insert: must be 'rank-one' or 'family' or 'entity'", "got a string"]),
    ("params-insert-not-a-name", params_edit("  lr: 0.1", "  lr: 0.1\n  insert: [entity]"), APPLY,
     ["params.yaml: rome.insert:"]),
    ("params-removed-option", params_edit("  lr: 0.1", "  lr: 0.1\n  protect_weight: 0.3"), APPLY,
     ["params.yaml: rome.protect_weight: unknown field"]),
    ("params-damage-tokens", params_append("bench:\n  damage: {tokens: -5}\n"), ("status",),
     ["params.yaml: bench.damage.tokens: must be >= 0, got -5"]),
    ("params-damage-text", params_append("bench:\n  damage: {text: 7}\n"), ("status",),
     ["params.yaml: bench.damage.text: must be a string, got 7"]),
    ("params-token-neighbors-k", params_append("bench:\n  token_neighbors: {k: -1}\n"), ("status",),
     ["params.yaml: bench.token_neighbors.k: must be >= 0, got -1"]),
    ("cli-bench-variant-range", write("r.json", "[]"),
     ("bench", "zsre", "--records", "r.json", "--methods", "rome", "--variant", "v1:insert=nope"),
     ["--variant 'v1:insert=nope': rome.insert: must be 'rank-one' or 'family' or 'entity'"]),
    ("cli-bench-variant-nan", write("r.json", "[]"),  # was accepted: lr = nan reached the editor
     ("bench", "zsre", "--records", "r.json", "--methods", "rome", "--variant", "v1:lr=nan"),
     ["--variant 'v1:lr=nan': rome.lr: must be a finite number, got nan"]),
    ("cli-bench-variant-key", write("r.json", "[]"),
     ("bench", "zsre", "--records", "r.json", "--methods", "rome", "--variant", "v1:nosuch=1"),
     ["--variant 'v1:nosuch=1': 'nosuch=1' is not key=value with a rome hyper-parameter"]),
    ("manifest-long-protect", edit_field("protect", "[" + LONG + "]"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].protect[0]: is 201 characters long"]),
    ("params-bad-on-add", params_edit("  lr: 0.1", "  lr: -1"), ("add", "edits/curie.yaml"), ["params.yaml: rome.lr: must be > 0"]),
    ("params-bad-on-revert", params_edit("  lr: 0.1", "  lr: -1"), ("revert", "a"), ["params.yaml: rome.lr: must be > 0"]),

    # ---- deltas ---------------------------------------------------------------------------------
    ("delta-float64", delta(set_tensor("edits.0.v", lambda v: v.double())), GEN_BAD, ["edits.0.v: dtype float64"]),
    ("delta-tampered", delta(set_tensor("edits.0.u", lambda u: u * 1.5), rehash=False), GEN_BAD,
     ["deltas/bad.safetensors: tensors_sha256: the factors' sha256"]),
    ("delta-no-hash", delta(lambda t, m: m.pop("tensors_sha256"), rehash=False), GEN_BAD,
     ["deltas/bad.safetensors: tensors_sha256: missing", "recompute it"]),
    ("delta-wrong-shape", delta(set_tensor("edits.0.u", lambda u: u[:-1].clone())), GEN_BAD,
     ["deltas/bad.safetensors: edits.0.u: shape", "does not fit d_out"]),
    ("delta-rank-mismatch", delta(lambda t, m: t.update({"edits.0.u": torch.zeros(len(t["edits.0.u"]), 2),
                                                         "edits.0.v": torch.zeros(len(t["edits.0.v"]), 3)})), GEN_BAD,
     ["deltas/bad.safetensors: edits.0: factors of shapes", "one rank r"]),
    ("delta-extra-tensor", delta(lambda t, m: t.update({"lm_head.weight": torch.zeros(3)})), GEN_BAD,
     ["deltas/bad.safetensors: lm_head.weight: a tensor the metadata does not list"]),
    ("delta-missing-tensor", delta(lambda t, m: t.pop("edits.0.v"), rehash=False), GEN_BAD,
     ["deltas/bad.safetensors: edits.0.v: missing"]),
    ("delta-garbage", write("deltas/bad.safetensors", b"\x00" * 64), GEN_BAD, ["deltas/bad.safetensors: not a romeflow delta file"]),
    ("delta-metadata-not-json", delta(lambda t, m: None, meta_text="{not json"), GEN_BAD,
     ["deltas/bad.safetensors: not a romeflow delta file (JSONDecodeError"]),
    ("delta-metadata-bad-field", delta(lambda t, m: m["edits"][0].update(layer=-2)), GEN_BAD,
     ["deltas/bad.safetensors: metadata edits[0].layer: must be >= 0, got -2"]),
    ("delta-missing-file", None, ("export", "exported", "--delta", "deltas/none.safetensors"),
     ["deltas/none.safetensors: delta file not found"]),

    ("delta-k-star-nan", delta(set_tensor("edits.0.k_star", lambda k: k * float("nan"))), GEN_BAD,
     ["deltas/bad.safetensors: edits.0.k_star: holds NaN or infinite values"]),
    ("delta-v-star-float64", delta(set_tensor("edits.0.v_star", lambda v: v.double())), GEN_BAD,
     ["deltas/bad.safetensors: edits.0.v_star: dtype float64, not float32"]),
    ("delta-v-star-shape", delta(set_tensor("edits.0.v_star", lambda v: v[:-1].clone())), GEN_BAD,
     ["deltas/bad.safetensors: edits.0.v_star: shape", "expected"]),
    ("delta-k-star-missing", delta(lambda t, m: t.pop("edits.0.k_star")), GEN_BAD,
     ["deltas/bad.safetensors: edits.0.k_star: missing"]),
    ("delta-k-star-tampered", delta(set_tensor("edits.0.k_star", lambda k: k * 2), rehash=False), GEN_BAD,
     ["deltas/bad.safetensors: tensors_sha256: the factors' sha256"]),
    ("delta-joint-without-pairs", both(params_edit("  window: 64", JOINT),
                                       delta(strip_pairs, src="deltas/a.safetensors", dst="deltas/b.safetensors")),
     ("stack",), ["deltas/b.safetensors: key_values: the delta holds no k*/v* pairs", "stack.method: joint"]),
    ("delta-onto-without-pairs", delta(strip_pairs), APPLY + ("--onto", "deltas/bad.safetensors"),
     ["deltas/bad.safetensors: key_values:", "--onto needs them"]),
    ("delta-onto-its-own-delta", None, APPLY + ("--onto", "deltas/curie.safetensors"),  # a ZeroDivisionError before
     ["edits/curie.yaml: edits[0]: 'Pierre Curie' with relation", "is already edited by deltas/curie.safetensors"]),
    ("stack-conflicting-manifests", manifest(A_CONFLICT, "b"), ("stack",),
     ["edits/b.yaml: edits[0].target: conflicts with edits/a.yaml edits[0]", "'law' vs 'medicine'"]),
    ("stack-conflicting-manifests-joint", both(params_edit("  window: 64", JOINT), manifest(A_CONFLICT, "b")),
     ("stack",), ["edits/b.yaml: edits[0].target: conflicts with edits/a.yaml edits[0]"]),
    ("manifest-add-conflicting", manifest(A_CONFLICT, "c2"), ("add", "edits/c2.yaml"),
     ["edits/c2.yaml: edits[0].target: conflicts with edits/a.yaml edits[0]"]),
    ("params-stack-method", params_edit("  window: 64", "  window: 64\n  method: product"), ("stack",),
     ["params.yaml: stack.method: must be 'sum' or 'joint', got a string"]),
    ("params-stack-ridge-negative", params_edit("  window: 64", "  window: 64\n  ridge: -1"), ("stack",),
     ["params.yaml: stack.ridge: must be >= 0, got -1"]),
    ("params-stack-null-space", params_edit("  window: 64", "  window: 64\n  null_space: 2"), ("stack",),
     ["params.yaml: stack.null_space: must be <= 1, got 2"]),
    ("params-stack-protect", params_edit("  window: 64", "  window: 64\n  protect: maybe"), ("stack",),
     ["params.yaml: stack.protect:"]),
    ("params-stack-gate-text-negative", params_edit("  window: 64", "  window: 64\n  gate_text: -1"), ("stack",),
     ["params.yaml: stack.gate_text: must be >= 0, got -1"]),
    ("params-stack-gate-text-float", params_edit("  window: 64", "  window: 64\n  gate_text: 0.5"), ("stack",),
     ["params.yaml: stack.gate_text:"]),
    ("params-stack-gate-text-huge", params_edit("  window: 64", "  window: 64\n  gate_text: 99999999"), ("stack",),
     ["params.yaml: stack.gate_text: must be <= 262144"]),
    ("params-stack-gate-refit-not-bool", params_edit("  window: 64", "  window: 64\n  gate_refit: 3"), ("stack",),
     ["params.yaml: stack.gate_refit:"]),

    # ---- statistics files -----------------------------------------------------------------------
    ("stats-nan", stats(lambda t, m: t["second_moment"].fill_diagonal_(float("nan"))),
     ("apply", "edits/curie.yaml", "--stats", "stats/bad.safetensors", "--out", "n.safetensors"),
     ["stats/bad.safetensors: second_moment: holds NaN"]),
    ("stats-float64", stats(lambda t, m: t.update(second_moment=t["second_moment"].double())),
     ("apply", "edits/curie.yaml", "--stats", "stats/bad.safetensors", "--out", "n.safetensors"),
     ["stats/bad.safetensors: second_moment: dtype float64, not float32"]),
    ("stats-not-square", stats(lambda t, m: t.update(second_moment=t["second_moment"][:-1].clone())),
     ("apply", "edits/curie.yaml", "--stats", "stats/bad.safetensors", "--out", "n.safetensors"),
     ["stats/bad.safetensors: not a romeflow statistics file (second_moment: shape"]),
    ("stats-asymmetric", stats(lambda t, m: t["second_moment"].__setitem__((0, 1), 1e3)),
     ("apply", "edits/curie.yaml", "--stats", "stats/bad.safetensors", "--out", "n.safetensors"),
     ["stats/bad.safetensors: second_moment: not a second moment"]),
    ("stats-tampered", stats(lambda t, m: t["second_moment"].mul_(2), rehash=False),
     ("apply", "edits/curie.yaml", "--stats", "stats/bad.safetensors", "--out", "n.safetensors"),
     ["stats/bad.safetensors: tensor_sha256: does not match"]),
    ("stats-meta-no-layer", stats(lambda t, m: m.pop("layer")),
     ("apply", "edits/curie.yaml", "--stats", "stats/bad.safetensors", "--out", "n.safetensors"),
     ["stats/bad.safetensors: layer: missing"]),
    ("stats-garbage", write("stats/bad.safetensors", b"garbage"),
     ("apply", "edits/curie.yaml", "--stats", "stats/bad.safetensors", "--out", "n.safetensors"),
     ["stats/bad.safetensors: not a romeflow statistics file"]),

    # ---- CLI paths and names --------------------------------------------------------------------
    ("revert-traversal", None, ("revert", "../../outside/victim"),
     ["params.yaml: manifests: manifest name '../../outside/victim' may only contain"]),
    ("revert-slash", None, ("revert", "a/b"), ["params.yaml: manifests: manifest name 'a/b'"]),
    ("revert-hidden", None, ("revert", ".a"), ["params.yaml: manifests: manifest name '.a'"]),
    ("revert-dotdot", None, ("revert", ".."), ["params.yaml: manifests: manifest name '..'"]),
    ("revert-reserved", None, ("revert", "stack"), ["params.yaml: manifests: manifest name 'stack' is reserved"]),
    ("revert-unregistered", None, ("revert", "curie"), ["params.yaml: manifests: 'curie' is not registered"]),
    ("verify-traversal", None, ("verify", "../a"), ["NAMES: manifest name '../a' may only contain"]),
    ("eval-name-with-dot", manifest(CURIE, "x.y"), ("eval", "edits/x.y.yaml"),
     ["edits/x.y.yaml: manifest name 'x.y' may only contain", "pass --delta"]),
    ("apply-name-with-space", manifest(CURIE, "my edit"), ("apply", "edits/my edit.yaml"),
     ["edits/my edit.yaml: manifest name 'my edit' may only contain", "pass --out"]),

    # ---- outputs --------------------------------------------------------------------------------
    ("apply-out-is-folder", None, ("apply", "edits/curie.yaml", "--stats", "stats/layer1.safetensors", "--out", "deltas"),
     ["Invalid value for '--out': File 'deltas' is a directory"]),
    ("apply-out-under-file", None, ("apply", "edits/curie.yaml", "--stats", "stats/layer1.safetensors", "--out", "afile/x.safetensors"),
     ["--out afile/x.safetensors: afile is not a folder"]),
    ("export-out-exists", None, ("export", "deltas", "--delta", "deltas/curie.safetensors"), ["deltas: already exists"]),
    ("export-out-under-file", None, ("export", "afile/exported", "--delta", "deltas/curie.safetensors"),
     ["OUT afile/exported: afile is not a folder"]),
    ("stats-out-under-file", None, ("stats", "--out", "afile/s.safetensors"), ["--out afile/s.safetensors: afile is not a folder"]),
    ("eval-out-is-folder", None, ("eval", "edits/curie.yaml", "--out", "edits"), ["Invalid value for '--out': File 'edits' is a directory"]),
    ("eval-details-under-file", None, ("eval", "edits/curie.yaml", "--out", "r.json", "--details", "afile/d.json"),
     ["--details afile/d.json: afile is not a folder"]),
    ("bench-out-is-file", write("r.json", "[]"), ("bench", "zsre", "--records", "r.json", "--methods", "rome", "--out", "afile"),
     ["Invalid value for '--out': Directory 'afile' is a file"]),
    ("trace-out-under-file", None, ("trace", "Pierre Curie is", "--subject", "Pierre Curie", "--out", "afile/t.json"),
     ["--out afile/t.json: afile is not a folder"]),
    ("stack-md-is-folder", None, ("stack", "--md", "edits"), ["Invalid value for '--md': File 'edits' is a directory"]),

    ("cli-threads-zero", None, ("--threads", "0", "status"), ["Invalid value for '--threads': 0 is not in the range"]),
    ("cli-top-k-zero", None, ("generate", "x", "--top-k", "0"), ["Invalid value for '--top-k'"]),
    ("cli-stats-layer-beyond-model", None, ("stats", "--layer", "5"), ["--layer: must be a layer of the model, 0 to 2, got 5"]),
    ("cli-stats-processes-zero", None, ("stats", "--processes", "0"), ["Invalid value for '--processes'"]),
    ("cli-export-format", None, ("export", "x", "--delta", "deltas/a.safetensors", "--format", "gguf"),
     ["Invalid value for '--format'"]),
    ("cli-stats-tokens-zero", None, ("stats", "--tokens", "0"), ["--tokens", "must be at least 1, got 0"]),
    ("cli-trace-samples-zero", None, ("trace", "Pierre Curie is", "--subject", "Pierre Curie", "--samples", "0"),
     ["--samples: must be >= 1, got 0"]),
    ("cli-bench-n-zero", write("r.json", "[]"), ("bench", "zsre", "--records", "r.json", "--methods", "rome", "--n", "0"),
     ["--n", "must be at least 1"]),
    ("cli-bench-shard", None, ("bench", "zsre", "--records", "r.json", "--shard", "3/2"), ["--shard", "1 <= K <= N"]),
    ("cli-bench-unknown-method", None, ("bench", "zsre", "--records", "r.json", "--methods", "rome,mend"),
     ["--methods: unknown method 'mend'"]),
    ("cli-bench-stack-method", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--methods", "sum,product", "--out", "run"),
     ["--methods", "unknown stack method 'product'"]),
    ("cli-bench-stack-k", write("r.json", "[]"), ("bench", "stack", "--records", "r.json", "--n", "2", "--k", "1,x",
                                                  "--out", "run"), ["--k", "comma-separated integers"]),
    ("cli-bench-stack-too-few-records", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run"), ["--n", "r.json has 0 records, fewer than 2"]),
    ("cli-bench-stack-skip-negative", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--skip", "-1", "--out", "run"), ["--skip", "must be at least 0"]),
    ("cli-bench-stack-skip-past-the-records", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--skip", "3", "--out", "run"),
     ["--n", "r.json has 0 records, fewer than 5 (--skip 3 + --n 2)"]),
    ("cli-bench-stack-heldout-missing", both(write("r.json", "[]"), params_edit("  heldout: data/heldout.txt",
                                                                                "  heldout: data/none.txt")),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run"), ["params.yaml: stack.heldout:", "none.txt not found"]),
    ("cli-bench-stack-variant-key", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run", "--variant", "ns:window=3"),
     ["--variant 'ns:window=3'", "not key=value with one of ridge, null_space, protect"]),
    ("cli-bench-stack-variant-range", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run", "--variant", "ns:null_space=2"),
     ["--variant 'ns:null_space=2'", "stack.null_space"]),
    ("cli-bench-stack-variant-nan", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run", "--variant", "r:ridge=nan"),
     ["--variant 'r:ridge=nan'", "stack.ridge: must be a finite number"]),
    ("cli-bench-stack-variant-margin", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run", "--variant", "c:margin=-1"),
     ["--variant 'c:margin=-1'", "stack.margin"]),
    ("cli-bench-stack-variant-gate-text", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run", "--variant", "g:gate_text=-5"),
     ["--variant 'g:gate_text=-5'", "stack.gate_text"]),
    ("cli-bench-stack-variant-gate-refit", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run", "--variant", "g:gate_refit=maybe"),
     ["--variant 'g:gate_refit=maybe'"]),
    ("params-stack-rounds", params_edit("  heldout: data/heldout.txt", "  heldout: data/heldout.txt\n  rounds: 0"),
     ("stack",), ["params.yaml: stack.rounds: must be >= 1, got 0"]),
    ("cli-bench-stack-variant-name", write("r.json", "[]"),
     ("bench", "stack", "--records", "r.json", "--n", "2", "--out", "run", "--variant", "joint:protect=false"),
     ["--variant 'joint:protect=false'", "the name must be new"]),
    ("cli-verify-atol-negative", None, ("verify", "a", "--atol", "-1"), ["Invalid value for '--atol'"]),

    # ---- faults ---------------------------------------------------------------------------------
    ("fault-stack-heldout-missing", params_edit("  heldout: data/heldout.txt", "  heldout: data/none.txt"), None,
     ["params.yaml: stack.heldout:", "data/none.txt not found"]),
    ("fault-stats-corpus-missing", params_edit("corpus: [data/corpus0.txt", "corpus: [data/none.txt"), ("stats",),
     ["data/none.txt: corpus file not found"]),
    ("fault-params-missing", write("other/.keep", ""), None, ["nope.yaml: cannot read params file"]),
    ("fault-params-unreadable-yaml", write("params.yaml", "rome: [\n"), APPLY, ["params.yaml: invalid YAML at line 2"]),
]

# Issue 22 §0: the stack file (reports/stack.safetensors) that `romeflow export` with no --delta rebuilds the
# pipeline's stack from, and the composition every command now takes from params.yaml stack:.
EXPORT_STACK = ("export", "exported")
ONLY_A = params_edit("  - b\n", "")  # manifests: [a] (the built project has no deltas/b)


def stack_file(manifests=("a",), joint: bool = False, change=None, rehash: bool = True):
    """reports/stack.safetensors as the stack stage writes it for deltas/<manifests>: sum (no tensors), or joint
    with delta a's factors standing for the solved update; then ``change(tensors, meta)``, the tensors' sha256
    recomputed (``rehash``) so that the check under test is the one that fires."""
    def setup(root: Path):
        from romeflow.pipeline.stackfile import tensor_names, tensors_sha256 as stack_sha256

        metas = {n: read_delta(root / "deltas" / f"{n}.safetensors") for n in manifests}
        tensors_a, meta_a = read_delta(root / "deltas" / "a.safetensors")
        e = meta_a["edits"][0]
        u, v = tensors_a["edits.0.u"], tensors_a["edits.0.v"]
        u, v = (u[:, None], v[:, None]) if u.dim() == 1 else (u, v)
        tensors = {"updates.0.u": u.contiguous(), "updates.0.v": v.contiguous()} if joint else {}
        meta = {"format": "romeflow.stackfile/1", "romeflow_version": "test", "base_model": meta_a["base_model"],
                "composition": ({"method": "joint", "settings": {"ridge": 0.0, "null_space": 0.0, "protect": True}}
                                if joint else {"method": "sum"}),
                "deltas": [{"manifest": n, "sha256": hashlib.sha256((root / "deltas" / f"{n}.safetensors").read_bytes())
                            .hexdigest(), "tensors_sha256": m["tensors_sha256"]} for n, (_, m) in metas.items()],
                "stats": [], "dtype": "float32", "weights_sha256": "0" * 64,
                "updates": ([{"module": e["module"], "layer": e["layer"], "d_out": u.shape[0], "d_in": v.shape[0],
                              "rank": u.shape[1]}] if joint else [])}
        if change is not None:
            change(tensors, meta)
        if rehash or "tensors_sha256" not in meta:
            meta["tensors_sha256"] = (stack_sha256(tensors, [n for n in tensor_names(meta) if n in tensors]) if rehash
                                      else "0" * 64)
        (root / "reports").mkdir(exist_ok=True)
        save_file(tensors, root / "reports" / "stack.safetensors", metadata={"romeflow": json.dumps(meta)})
    return setup


def tamper(t, m):
    t["updates.0.u"] = t["updates.0.u"] * 2


def stack_meta(**fields):
    def change(t, m):
        m.update(fields)
    return change


REFIT = {"low": 0.3, "high": 0.5, "beta": 20.0, "refit": True}  # a gate whose direction stack.gate_refit refitted


def refit_gate(a: torch.Tensor):
    def change(t, m):
        m["gates"] = [REFIT]
        t["gates.0.a"] = a
    return change


CASES += [
    ("stackfile-missing", ONLY_A, EXPORT_STACK,
     ["reports/stack.safetensors: stack file not found", "`dvc repro`"]),
    ("stackfile-garbage", both(ONLY_A, write("reports/stack.safetensors", b"\x00" * 64)), EXPORT_STACK,
     ["reports/stack.safetensors: not a romeflow stack file"]),
    ("stackfile-tampered", both(ONLY_A, stack_file(joint=True, change=tamper, rehash=False)), EXPORT_STACK,
     ["reports/stack.safetensors: tensors_sha256: the tensors' sha256 is"]),
    ("stackfile-nan", both(ONLY_A, stack_file(joint=True, change=set_tensor("updates.0.v", lambda v: v * float("nan")))),
     EXPORT_STACK, ["reports/stack.safetensors: updates.0.v: holds NaN or infinite values"]),
    ("stackfile-float64", both(ONLY_A, stack_file(joint=True, change=set_tensor("updates.0.u", lambda u: u.double()))),
     EXPORT_STACK, ["reports/stack.safetensors: updates.0.u: dtype float64, not float32"]),
    ("stackfile-rank", both(ONLY_A, stack_file(joint=True, change=lambda t, m: m["updates"][0].update(rank=3))),
     EXPORT_STACK, ["reports/stack.safetensors: updates.0.u: shape", "the metadata says"]),
    ("stackfile-extra-tensor", both(ONLY_A, stack_file(joint=True, change=lambda t, m: t.update({"w": torch.zeros(2)}))),
     EXPORT_STACK, ["reports/stack.safetensors: w: a tensor the metadata does not list"]),
    ("stackfile-refit-gate-missing", both(ONLY_A, stack_file(change=stack_meta(gates=[REFIT]))), EXPORT_STACK,
     ["reports/stack.safetensors: gates.0.a: missing"]),
    ("stackfile-refit-gate-shape", both(ONLY_A, stack_file(change=refit_gate(torch.zeros(2, 3)))), EXPORT_STACK,
     ["reports/stack.safetensors: gates.0.a: shape (2, 3), not a gate direction (d_model,)"]),
    ("stackfile-refit-gate-nan", both(ONLY_A, stack_file(change=refit_gate(torch.full((8,), float("nan"))))),
     EXPORT_STACK, ["reports/stack.safetensors: gates.0.a: not a finite float32 gate direction"]),
    ("stackfile-method", both(ONLY_A, stack_file(change=stack_meta(composition={"method": "product"}))), EXPORT_STACK,
     ["reports/stack.safetensors: metadata composition.method: must be 'sum' or 'joint'"]),
    ("stackfile-no-hash", both(ONLY_A, stack_file(change=lambda t, m: m.update(tensors_sha256=None), rehash=False)),
     EXPORT_STACK,
     ["reports/stack.safetensors: metadata tensors_sha256: must be a string"]),
    ("stackfile-sum-with-updates", both(ONLY_A, stack_file(joint=True, change=stack_meta(composition={"method": "sum"}))),
     EXPORT_STACK, ["reports/stack.safetensors: updates: solved updates in a stack composed by 'sum'"]),
    ("stackfile-stale-manifests", both(ONLY_A, stack_file(manifests=("a", "curie"))), EXPORT_STACK,
     ["reports/stack.safetensors: deltas: composed ['a', 'curie'], params.yaml manifests: lists ['a']",
      "run `dvc repro`"]),
    ("stackfile-stale-delta", both(ONLY_A, stack_file(change=lambda t, m: m["deltas"][0].update(sha256="0" * 64))),
     EXPORT_STACK, ["reports/stack.safetensors: deltas[0]: deltas/a.safetensors changed since the stack was composed"]),
    ("stackfile-stale-composition", both(ONLY_A, params_edit("  window: 64", JOINT), stack_file()), EXPORT_STACK,
     ["reports/stack.safetensors: composition: composed with sum, params.yaml stack: says joint (ridge 0.0"]),
    ("export-stack-no-manifests", params_edit("  - a\n  - b\n", "  []\n"), EXPORT_STACK,
     ["params.yaml: manifests: no active manifest, so no stack to export; give --delta"]),
    ("stack-weights-is-folder", None, ("stack", "--weights", "edits"),
     ["Invalid value for '--weights': File 'edits' is a directory"]),
    ("stack-weights-is-the-report", None, ("stack", "--weights", "r.json", "--out", "r.json"),
     ["--weights r.json: is also --out r.json"]),
    ("stack-weights-is-a-delta", None, ("stack", "--weights", "deltas/a.safetensors"),
     ["--weights deltas/a.safetensors: is also an input (the delta deltas/a.safetensors)"]),
    ("eval-joint-without-pairs", both(params_edit("  window: 64", JOINT), delta(strip_pairs)),
     ("eval", "edits/curie.yaml", "--delta", "deltas/bad.safetensors"),
     ["deltas/bad.safetensors: key_values: the delta holds no k*/v* pairs", "stack.method: joint needs them"]),
    ("generate-joint-without-pairs", both(params_edit("  window: 64", JOINT), delta(strip_pairs)), GEN_BAD,
     ["deltas/bad.safetensors: key_values:", "stack.method: joint needs them"]),
    ("export-joint-without-pairs", both(params_edit("  window: 64", JOINT), delta(strip_pairs)),
     ("export", "exported", "--delta", "deltas/bad.safetensors"), ["deltas/bad.safetensors: key_values:"]),
    ("generate-joint-other-stats", both(params_edit("  window: 64", JOINT), stats(lambda t, m: t["second_moment"].mul_(2),
                                                                                 dst="stats/layer1.safetensors")),
     ("generate", "Pierre Curie", "--delta", "deltas/curie.safetensors"),
     ["deltas/curie.safetensors: stats: computed with other statistics of layer 1", "recompute it"]),
]

# Issue 20 §5: outputs that are inputs, outputs and inputs that are not regular files, numbers too long
# to convert, prompts too long, layers that only `apply` checked, symlink loops.
FACTS = '[{"known_id": 0, "subject": "Pierre Curie", "attribute": " physics", "prompt": "Pierre Curie worked in"}]'
TRACE = ("trace", "Pierre Curie worked in", "--subject", "Pierre Curie")
DIGITS = "9" * 5000
CASES += [
    ("out-is-input-apply-manifest", None, APPLY[:-1] + ("edits/curie.yaml",),
     ["--out edits/curie.yaml: is also an input (the manifest edits/curie.yaml)"]),
    ("out-is-input-apply-stats", None, APPLY[:-1] + ("stats/layer1.safetensors",),
     ["--out stats/layer1.safetensors: is also an input (--stats stats/layer1.safetensors)"]),
    ("out-is-input-apply-onto", None, APPLY[:-1] + ("deltas/a.safetensors", "--onto", "deltas/a.safetensors"),
     ["--out deltas/a.safetensors: is also an input (--onto deltas/a.safetensors)"]),
    ("out-is-input-apply-params", None, APPLY[:-1] + ("params.yaml",),
     ["--out params.yaml: is also an input (the params file params.yaml)"]),
    ("out-is-input-eval-delta", None,
     ("eval", "edits/curie.yaml", "--delta", "deltas/curie.safetensors", "--out", "deltas/curie.safetensors"),
     ["--out deltas/curie.safetensors: is also an input (--delta deltas/curie.safetensors)"]),
    ("out-is-input-eval-default-delta", None, ("eval", "edits/curie.yaml", "--out", "deltas/curie.safetensors"),
     ["--out deltas/curie.safetensors: is also an input (the delta deltas/curie.safetensors)"]),
    ("out-is-input-eval-manifest", None, ("eval", "edits/curie.yaml", "--details", "edits/curie.yaml", "--out", "r.json"),
     ["--details edits/curie.yaml: is also an input (the manifest edits/curie.yaml)"]),
    ("out-is-details-eval", None, ("eval", "edits/curie.yaml", "--out", "S.json", "--details", "S.json"),
     ["--details S.json: is also --out S.json"]),
    ("out-is-input-stack-md", None, ("stack", "--md", "params.yaml"), ["--md params.yaml: is also an input (the params file"]),
    ("out-is-input-stack-delta", None, ("stack", "--out", "deltas/a.safetensors"),
     ["--out deltas/a.safetensors: is also an input (the delta deltas/a.safetensors)"]),
    ("out-is-md-stack", None, ("stack", "--out", "r.json", "--md", "r.json"), ["--md r.json: is also --out r.json"]),
    ("out-is-input-stats-corpus", None, ("stats", "--corpus", "data/corpus0.txt", "--out", "data/corpus0.txt"),
     ["--out data/corpus0.txt: is also an input (--corpus data/corpus0.txt)"]),
    ("out-is-input-stats-params-corpus", None, ("stats", "--out", "data/corpus1.txt"),
     ["--out data/corpus1.txt: is also an input (params.yaml: stats.corpus data/corpus1.txt)"]),
    ("out-is-input-trace", None, TRACE + ("--out", "params.yaml"), ["--out params.yaml: is also an input (the params file"]),
    ("out-is-plot-trace", None, TRACE + ("--plot", "t.png", "--plot", "t.png"), ["--plot t.png: is also --plot t.png"]),
    ("out-is-input-trace-average-rows", write("data/facts.json", FACTS),
     ("trace-average", "--facts", "data/facts.json", "--rows", "data/facts.json", "--out", "tr"),
     ["--rows data/facts.json: is also an input (--facts data/facts.json)"]),
    ("out-is-device-apply", special("devnull", "chr"), APPLY[:-1] + ("devnull",),
     ["--out devnull: is a character device, not a regular file; refusing to replace it"]),
    ("out-is-fifo-eval", special("r.fifo", "fifo"), ("eval", "edits/curie.yaml", "--out", "r.fifo"),
     ["--out r.fifo: is a FIFO (named pipe), not a regular file"]),
    ("out-is-socket-stats", special("s.sock", "sock"), ("stats", "--out", "s.sock"), ["--out s.sock: is a socket"]),
    ("out-is-device-trace-rows", both(write("data/facts.json", FACTS), special("rows.jsonl", "chr")),
     ("trace-average", "--facts", "data/facts.json", "--rows", "rows.jsonl", "--out", "tr"), ["--rows rows.jsonl: is a character device"]),
    ("fifo-manifest-apply", special("edits/bad.yaml", "fifo"), APPLY_BAD,
     ["edits/bad.yaml: manifest is a FIFO (named pipe), not a regular file"]),
    ("fifo-manifest-add", special("edits/bad.yaml", "fifo"), ("add", "edits/bad.yaml"), ["edits/bad.yaml: manifest is a FIFO"]),
    ("fifo-manifest-eval", special("edits/bad.yaml", "fifo"), ("eval", "edits/bad.yaml"), ["edits/bad.yaml: manifest is a FIFO"]),
    ("device-manifest", special("edits/bad.yaml", "chr"), APPLY_BAD, ["edits/bad.yaml: manifest is a character device"]),
    ("socket-manifest", special("edits/bad.yaml", "sock"), APPLY_BAD, ["edits/bad.yaml: manifest is a socket"]),
    ("fifo-params", special("p.yaml", "fifo"), None, ["p.yaml: params file is a FIFO (named pipe)"]),
    ("fifo-delta", special("deltas/bad.safetensors", "fifo"), GEN_BAD,
     ["deltas/bad.safetensors: delta file is a FIFO (named pipe), not a regular file"]),
    ("socket-delta", special("deltas/bad.safetensors", "sock"), GEN_BAD, ["deltas/bad.safetensors: delta file is a socket"]),
    ("delta-symlink-loop", symlink("deltas/bad.safetensors", "bad.safetensors"), GEN_BAD,
     ["deltas/bad.safetensors: delta file is a symbolic link loop"]),
    ("delta-dangling-symlink", symlink("deltas/bad.safetensors", "gone.safetensors"), GEN_BAD,
     ["deltas/bad.safetensors: delta file is a symbolic link to a missing file"]),
    ("fifo-stats", special("stats/bad.safetensors", "fifo"), APPLY + ("--stats", "stats/bad.safetensors"),
     ["stats/bad.safetensors: statistics file is a FIFO (named pipe)"]),
    ("fifo-records", special("r.json", "fifo"), ("bench", "zsre", "--records", "r.json", "--methods", "rome"),
     ["r.json: zsRE records file is a FIFO (named pipe)"]),
    ("fifo-facts", special("data/facts.json", "fifo"), ("trace-average", "--facts", "data/facts.json"),
     ["data/facts.json: facts file is a FIFO (named pipe)"]),
    ("manifest-5000-digit-layer", edit_field("layer", DIGITS), APPLY_BAD,
     ["edits/bad.yaml: edits[0].layer: a number of 5000 characters, more than the 100 allowed"]),
    ("manifest-5000-digit-float", edit_field("layer", DIGITS + ".5"), APPLY_BAD,
     ["edits/bad.yaml: edits[0].layer: a number of 5002 characters"]),
    ("params-5000-digit-steps", params_edit("  steps: 6", "  steps: " + DIGITS), APPLY,
     ["params.yaml: rome.steps: a number of 5000 characters, more than the 100 allowed"]),
    ("records-5000-digit", write("r.json", '[{"subject": ' + DIGITS + '}]'),
     ("bench", "zsre", "--records", "r.json", "--methods", "rome"), ["r.json: invalid JSON (a number of more than"]),
    ("cli-generate-prompt-too-long", None, ("generate", "w " * 3000), ["PROMPT: is 6000 characters long, more than the 2000 allowed"]),
    ("cli-trace-prompt-too-long", None, ("trace", "Pierre Curie " + "w " * 1000, "--subject", "Pierre Curie"),
     ["PROMPT: is 2013 characters long, more than the 2000 allowed"]),
    ("cli-trace-target-too-long", None, TRACE + ("--target", "t" * 201), ["--target: is 201 characters long, more than the 200"]),
    ("params-layer-999-status", params_edit("  layer: 1", "  layer: 999"), ("status",),
     ["params.yaml: rome.layer: must be a layer of the model, 0 to 2, got 999"]),
    ("manifest-layer-beyond-model-status", manifest("layer: 7\n" + CURIE, "a"), ("status",),
     ["edits/a.yaml: layer: must be a layer of the model, 0 to 2, got 7"]),
    ("manifest-symlink-to-passwd", symlink("edits/bad.yaml", "/etc/passwd"), APPLY_BAD,
     ["edits/bad.yaml: (top level): must be a mapping, got a string"]),
]
SPECIAL_ARGV_20 = {"fifo-params": ("--params", "p.yaml", "status")}


# The bad deltas the issue reproduced, for each command that composes deltas.
NAN = set_tensor("edits.0.u", lambda u: u * float("nan"))
INF = set_tensor("edits.0.v", lambda v: v.index_fill(0, torch.tensor([0]), float("inf")))
INT32 = set_tensor("edits.0.u", lambda u: u.to(torch.int32))
HUGE = set_tensor("edits.0.u", lambda u: u * 1e30)
DELTA_FAULTS = {"nan": (NAN, "edits.0.u: holds NaN or infinite values"),
                "inf": (INF, "edits.0.v: holds NaN or infinite values"),
                "int32": (INT32, "edits.0.u: dtype int32, not float32"),
                "x1e30": (HUGE, "edits.0: ‖u‖·‖v‖ ="),
                "duplicate": (None, "the same delta as")}
DELTA_COMMANDS = {"generate": ("generate", "Pierre Curie", "--delta", "deltas/curie.safetensors", "--delta", "{bad}"),
                  "eval": ("eval", "edits/curie.yaml", "--delta", "deltas/curie.safetensors", "--delta", "{bad}"),
                  "export": ("export", "exported", "--delta", "deltas/curie.safetensors", "--delta", "{bad}"),
                  "stack": ("stack",)}


def delta_case(fault: str, command: str):
    change, message = DELTA_FAULTS[fault]
    stack = command == "stack"  # the stack reads deltas/a and deltas/b (both registered)
    bad = "deltas/b.safetensors" if stack else "deltas/bad.safetensors"
    if fault == "duplicate":
        setup = (lambda root: shutil.copy(root / "deltas/a.safetensors", root / bad)) if stack else \
            (lambda root: shutil.copy(root / "deltas/curie.safetensors", root / bad))
    else:
        setup = delta(change, src="deltas/a.safetensors" if stack else "deltas/curie.safetensors", dst=bad)
    argv = tuple(a.format(bad=bad) for a in DELTA_COMMANDS[command])
    return (f"delta-{fault}-{command}", setup, argv, [f"{bad}: {message}"])


CASES += [delta_case(f, c) for f in DELTA_FAULTS for c in DELTA_COMMANDS]

# apply-all (the DVC stage `edit`): every active manifest is checked before any model loads or any delta is written
APPLY_ALL = ("apply-all", "--stats", "stats/layer1.safetensors")
CASES += [
    ("apply-all-name-traversal", None, ("apply-all", "../outside/victim"),
     ["NAMES", "manifest name '../outside/victim' may only contain letters, digits, '_' and '-'"]),
    ("apply-all-name-twice", None, ("apply-all", "a", "curie", "a"), ["NAMES", "'a' is given twice"]),
    ("apply-all-name-missing", None, ("apply-all", "a", "nope"), ["edits/nope.yaml"]),
    ("apply-all-processes-0", None, APPLY_ALL + ("--processes", "0"), ["--processes", "0 is not in the range"]),
    ("params-processes-0", params_append("processes: 0\n"), APPLY_ALL, ["params.yaml: processes: must be >= 1, got 0"]),
    ("params-processes-not-a-number", params_append("processes: many\n"), APPLY_ALL, ["params.yaml: processes: must be an integer"]),
    ("manifest-bad-among-the-active", manifest(CURIE.replace("target: medicine", "target: ''"), "b"), APPLY_ALL,
     ["edits/b.yaml: edits[0].target: must not be empty"]),
    ("manifest-other-model-apply-all", manifest("model: gemma-3-270m\n" + CURIE, "b"), APPLY_ALL,
     ["edits/b.yaml: model: 'gemma-3-270m' is not params.yaml's model"]),
    ("manifest-layer-beyond-model-apply-all", manifest("layer: 7\n" + CURIE, "b"), APPLY_ALL,
     ["edits/b.yaml: layer: must be a layer of the model, 0 to 2, got 7"]),
    ("apply-all-out-is-folder", write("deltas/b.safetensors/x", "x"), APPLY_ALL,
     ["delta deltas/b.safetensors: is a folder, not a file"]),
    ("apply-all-out-is-fifo", special("deltas/b.safetensors", "fifo"), APPLY_ALL,
     ["delta deltas/b.safetensors: is a FIFO (named pipe), not a regular file"]),
    ("fifo-stats-apply-all", special("stats/bad.safetensors", "fifo"), ("apply-all", "--stats", "stats/bad.safetensors"),
     ["stats/bad.safetensors: statistics file is a FIFO (named pipe)"]),
    ("stats-of-another-model-apply-all", stats(lambda t, m: m.update(model_fingerprint="0" * 64)),
     ("apply-all", "--stats", "stats/bad.safetensors"), ["stats/bad.safetensors: statistics of another model"]),
]

# Cases whose setup or command needs the built project's own files.
SPECIAL_ARGV = {
    "fault-stack-heldout-missing": ("stack",),
    "fault-params-missing": ("--params", "nope.yaml", "status"),
    **SPECIAL_ARGV_20,
}


def special_setup(case_id: str, root: Path) -> None:
    if case_id == "fault-stack-heldout-missing":
        (root / "params.yaml").write_text((root / "params.yaml").read_text().replace("  - b\n", ""))


@contextlib.contextmanager
def deadline(seconds: int):
    """SIGALRM after ``seconds``: a call blocked in open() (a FIFO) raises TimeoutError instead of hanging."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def project(built, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(built, root)
    return root


def test_the_corpus_is_large_and_covers_every_class():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60
    for prefix in ("manifest-", "params-", "delta-", "stats-", "revert-", "-out-", "fault-"):
        assert any(prefix in i for i in ids), prefix


@pytest.mark.parametrize("case_id, setup, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(project, case_id, setup, argv, expected):
    if setup is not None:
        setup(project)
    special_setup(case_id, project)
    before = snapshot(project)
    argv = SPECIAL_ARGV.get(case_id, argv)
    if argv[0] == "--params":  # a params file other than params.yaml
        cwd = os.getcwd()
        os.chdir(project)
        try:
            with deadline(60):
                r = CliRunner().invoke(main, list(argv))
        finally:
            os.chdir(cwd)
    else:
        with deadline(60):  # a FIFO opened for reading blocks: fail, never hang
            r = cli(project, *argv)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.exit_code != 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no traceback
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert snapshot(project) == before  # nothing written, changed or deleted
    assert (project / "outside" / "victim.txt").read_text() == "must survive\n"


# --------------------------------------------------------------------------------------------------
# The alias bomb costs nothing; the library refuses it as the CLI does
# --------------------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_in_under_a_second_and_100_mb():
    deeper = BOMB + "".join(f"    x{i}: &e{i} [" + ",".join([f"*{'d' if i == 0 else f'e{i - 1}'}"] * 9) + "]\n"
                            for i in range(6))
    for text in (BOMB, deeper):
        tracemalloc.start()
        t = time.perf_counter()
        with pytest.raises(safeyaml.YamlError, match="anchors"):
            safeyaml.loads(text, "bomb.yaml")
        took = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert took < 1.0 and peak < 100e6, (took, peak)


FIELDS = ["subject", "relation", "target", "target_true", "paraphrases", "neighbors", "layer"]


@pytest.mark.parametrize("where", FIELDS + ["description", "model", "top-level layer"])
def test_alias_bomb_in_any_manifest_field_is_refused_fast(tmp_path, where):
    from romeflow.pipeline.manifests import ManifestError, load_manifest

    bomb = "&a [" + ",".join(['"lol"'] * 9) + "]"
    value = f"[{bomb}, &b [{','.join(['*a'] * 9)}], &c [{','.join(['*b'] * 9)}], [{','.join(['*c'] * 9)}]]"
    lines = [l for l in CURIE.splitlines() if not (where in FIELDS and l.strip().startswith(f"{where}:"))]
    if where in FIELDS:
        lines.insert(2, f"    {where}: {value}")
        field = f"edits[0].{where}"
    else:
        key = "layer" if where == "top-level layer" else where
        lines.insert(0, f"{key}: {value}")
        field = key
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    took, peak = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(e.value).startswith(f"{path}: {field}") and "anchors (&a) are not allowed" in str(e.value)
    assert took < 1.0 and peak < 100e6, (took, peak)


def test_yaml_12_floats_and_plain_data():
    assert safeyaml.loads("a: 1e-3\nb: 2E+2\nc: '1e-3'\nd: [1, x]\n", "f.yaml") == {"a": 0.001, "b": 200.0, "c": "1e-3",
                                                                                     "d": [1, "x"]}


def test_params_schema_has_a_rule_for_every_dataclass_field():
    import json as _json
    from dataclasses import fields as _fields

    from romeflow.params import _DATACLASS_SECTIONS
    from romeflow.schemas import _schema_text

    raw = _json.loads(_schema_text("params"))
    for path, cls in _DATACLASS_SECTIONS.items():
        node = raw
        for part in path:
            node = node["properties"][part]
        missing = {f.name for f in _fields(cls)} - set(node["properties"])
        assert not missing, (path, missing)  # a new field needs a range rule in schemas/params.schema.json


def test_gate_metrics_rome_r1_and_variants_come_from_the_one_model():
    from romeflow.params import METRICS, parse_params, schema
    from romeflow.pipeline.workflow import METRICS as REPORTED

    assert METRICS == REPORTED and set(schema()["properties"]["gate"]["properties"]["eval"]["properties"]) == set(METRICS)
    p = parse_params({"rome": {"insert": "entity"}, "gate": {"eval": {"NS_tok": 50, "S+": 60}}})
    assert p.method("rome").insert == "entity" and p.method("rome-r1").insert == "rank-one" and p.gate.eval["S+"] == 60.0
    name, v = p.rome_variant("l2:layer=2:protect_sources=wikipedia+a.txt")
    assert name == "l2" and v.layer == 2 and v.protect_sources == ("wikipedia", "a.txt")


def test_params_defaults_and_the_shipped_file_are_valid():
    from romeflow.params import Params, load_params

    repo = Path(__file__).resolve().parent.parent
    p = load_params(repo / "params.yaml")
    assert p.rome.layer >= 0 and p.manifests and p.ftl.linf > 0 and p.bench.generation.templates
    assert Params().rome.lr > 0


def test_revert_of_a_traversal_name_listed_nowhere_deletes_nothing(project):
    """Even a name that reaches the registry by hand (not via params.yaml) never becomes a path."""
    victim = project / "outside" / "victim.txt"
    with pytest.raises(ValueError, match="may only contain"):
        unregister(project / "params.yaml", "../outside/victim")
    assert victim.exists()


def test_writes_get_normal_permissions_and_leave_no_temporary(project):
    umask = os.umask(0o022)
    try:
        r = cli(project, "apply", "edits/curie.yaml", "--stats", "stats/layer1.safetensors", "--out", "perm/d.safetensors")
    finally:
        os.umask(umask)
    assert r.exit_code == 0, r.output
    assert (project / "perm" / "d.safetensors").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (project / "perm").iterdir()] == ["d.safetensors"]


def test_leftover_temporaries_of_dead_processes_are_removed_by_the_next_write(project):
    from romeflow.io import TMP_PREFIX, write_text_atomic

    folder = project / "reports"
    folder.mkdir(exist_ok=True)
    dead = folder / f"{TMP_PREFIX}-999999999-x.json.abc"  # no such process
    dead.write_text("half")
    dead_dir = folder / f"{TMP_PREFIX}-999999999-exported.xyz"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_text("half")
    alive = folder / f"{TMP_PREFIX}-{os.getppid()}-y.json.abc"  # a running process's: kept
    alive.write_text("in use")
    write_text_atomic(folder / "z.txt", "ok\n")
    assert not dead.exists() and not dead_dir.exists() and alive.exists()
    assert (folder / "z.txt").read_text() == "ok\n"


# --------------------------------------------------------------------------------------------------
# Concurrency: add / revert under the lock lose nothing
# --------------------------------------------------------------------------------------------------


def _worker(params: str, op: str, name: str, barrier) -> None:
    barrier.wait()
    (register if op == "add" else unregister)(Path(params), name)


def test_concurrent_add_and_revert_lose_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("# registry under load\nrome:\n  lr: 0.1   # kept\n\nmanifests:\n  - keep\n  - r0a\n  - r0b\n\n"
                      "stack:\n  window: 64\n")
    expected = ["keep", "r0a", "r0b"]
    ctx = multiprocessing.get_context("fork")
    for rnd in range(1, 21):
        ops = [("add", f"r{rnd}a"), ("add", f"r{rnd}b"), ("revert", f"r{rnd - 1}a"), ("revert", f"r{rnd - 1}b")]
        barrier = ctx.Barrier(len(ops))
        procs = [ctx.Process(target=_worker, args=(str(params), op, name, barrier)) for op, name in ops]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], rnd
        expected = [n for n in expected if n not in (f"r{rnd - 1}a", f"r{rnd - 1}b")] + [f"r{rnd}a", f"r{rnd}b"]
        assert sorted(read_manifests(params)) == sorted(expected), rnd
    text = params.read_text()
    assert text.startswith("# registry under load\nrome:\n  lr: 0.1   # kept\n") and "stack:\n  window: 64\n" in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".romeflow-tmp")]


# --------------------------------------------------------------------------------------------------
# Good inputs stay accepted; faults while writing leave nothing; the stage scripts
# --------------------------------------------------------------------------------------------------


def test_a_rank_r_delta_is_accepted_on_load(project):
    from romeflow.pipeline.deltas import load_delta

    def to_rank_2(t, m):
        t["edits.0.u"] = torch.stack([t["edits.0.u"], t["edits.0.u"] / 2], 1)  # (d_out, 2)
        t["edits.0.v"] = torch.stack([t["edits.0.v"], -t["edits.0.v"]], 1)  # (d_in, 2)
        m["edits"][0]["rank"] = 2
        m["edits"][0]["protected"] = ["Marie Curie"]

    delta(to_rank_2)(project)
    d = load_delta(project / "deltas" / "bad.safetensors")
    assert d.updates[0].u.shape[1] == 2 and d.meta["edits"][0]["rank"] == 2
    delta(lambda t, m: (to_rank_2(t, m), m["edits"][0].update(rank=3)))(project)
    with pytest.raises(ValueError, match="rank 3 in the metadata, 2 in the factors"):
        load_delta(project / "deltas" / "bad.safetensors")


def test_new_rome_fields_need_only_a_range_rule(monkeypatch):
    """A new RomeParams field is allowed as soon as the dataclass has it, with the range rule the schema gives it."""
    import dataclasses
    import json

    from romeflow import params as P
    from romeflow.engine.rome import RomeParams

    cls = dataclasses.make_dataclass("RomeWithMargin", [("margin", float, 0.0)], bases=(RomeParams,), frozen=True)
    text = json.loads(P._schema_text("params"))
    text["properties"]["rome"]["properties"]["margin"] = {"type": "number", "minimum": 0, "maximum": 100}
    monkeypatch.setitem(P._DATACLASS_SECTIONS, ("rome",), cls)
    monkeypatch.setattr(P, "_schema_text", lambda name: json.dumps(text))
    for f in (P.schema, P._validator, P._section_validator):
        f.cache_clear()
    try:
        assert P.validate_with(P._validator(), {"rome": {"margin": 3.0, "insert": "entity"}}) == []
        for body, message in [({"margin": -1}, "must be >= 0, got -1"), ({"margin": 101}, "must be <= 100"),
                              ({"insert": "nope"}, "must be 'rank-one' or 'family' or 'entity'")]:
            errors = P.validate_with(P._validator(), {"rome": body})
            assert errors and message in errors[0][1], (body, errors)
    finally:
        for f in (P.schema, P._validator, P._section_validator):
            f.cache_clear()


def test_a_full_disk_while_writing_leaves_no_temporary_and_no_target(project, monkeypatch):
    import errno

    import romeflow.pipeline.deltas as deltas_module

    def full(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")  # a partial temporary, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(deltas_module, "save_file", full)
    r = cli(project, "apply", "edits/curie.yaml", "--stats", "stats/layer1.safetensors", "--out", "full/d.safetensors")
    assert r.exit_code != 0 and r.stderr.strip().splitlines()[-1] == ("Error: full/d.safetensors: cannot write (No "
                                                                       "space left on device)")
    assert not (project / "full" / "d.safetensors").exists() and list((project / "full").iterdir()) == []


def test_stage_script_with_a_bad_name_is_one_line(project):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "stages", project / "stages")
    before = snapshot(project)
    r = subprocess.run([sys.executable, "stages/eval.py", "../outside/victim"], cwd=project, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and lines == ["Error: manifest name '../outside/victim' may only contain letters, digits, "
                                           "'_' and '-'"], r.stderr
    assert snapshot(project) == before


def test_embedded_conversion_is_atomic_and_its_leftovers_are_removed(tmp_path, monkeypatch, tiny_lm):
    """convert_embedded builds the folder under .romeflow-tmp-...: a failure leaves nothing, a killed
    conversion's leftover goes at the next one (a fake GGUF and a tiny model stand in for Gemma)."""
    import hashlib as _hashlib

    import transformers

    from romeflow.engine import models

    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"not really a gguf")
    entry = models.EmbeddedModel(lambda scratch: gguf, _hashlib.sha256(gguf.read_bytes()).hexdigest(), "none")
    monkeypatch.setitem(models.EMBEDDED, "fake-model", entry)
    lm = tiny_lm("gpt2")
    cache = tmp_path / "cache"
    target = models.converted_folder("fake-model", cache)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ValueError, match="cannot write [(]No space left on device[)]"):  # io.OutputError, one line
        models.convert_embedded("fake-model", cache)
    assert list(target.parent.iterdir()) == []  # nothing half-built left
    leftover = target.parent / f".romeflow-tmp-999999999-{target.name}.abc"  # a killed conversion's
    leftover.mkdir()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: copy_of(lm.model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: lm.tokenizer)
    assert models.convert_embedded("fake-model", cache) == target
    assert (target / "romeflow-model.json").is_file() and not leftover.exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_revert_removes_a_symlinked_delta_but_never_its_target(project):
    victim = project / "outside" / "victim.txt"
    link = project / "deltas" / "a.safetensors"
    link.unlink()
    link.symlink_to(victim)
    r = cli(project, "revert", "a")
    assert r.exit_code == 0, r.output
    assert not link.exists() and not link.is_symlink() and victim.read_text() == "must survive\n"
    assert read_manifests(project / "params.yaml") == ["b"]


def test_the_shipped_manifests_pass_the_limits():
    from romeflow.pipeline.manifests import load_manifest

    repo = Path(__file__).resolve().parent.parent
    shipped = sorted((repo / "edits").glob("*.yaml"))
    assert shipped
    for path in shipped:
        assert load_manifest(path).edits


# --------------------------------------------------------------------------------------------------
# kill -9 during apply and export (forked children: no interpreter start-up; bench/kill9.py does the
# same with fresh processes at 10 moments each)
# --------------------------------------------------------------------------------------------------


def _run_cli_in(root: str, argv: list[str], stall: str | None, stalled) -> None:
    """The CLI in a forked child; ``stall`` makes it stop (and say so) at one moment of its write, so the
    parent's kill -9 lands exactly there: 'mid-write' (half a file written), 'before-rename'."""
    import romeflow.pipeline.deltas as deltas_module
    import romeflow.io as io_module

    def wait_forever(*args, **kwargs):
        stalled.set()
        time.sleep(600)

    if stall == "mid-write":
        def half(tensors, path, metadata=None):
            Path(path).write_bytes(b"half a delta")
            wait_forever()
        deltas_module.save_file = half
        real_write = Path.write_text

        def export_json(self, text, *a, **k):  # export: the model files are written, the last one is not
            if self.name == "romeflow-export.json":
                real_write(self, text[:10])
                wait_forever()
            return real_write(self, text, *a, **k)
        Path.write_text = export_json
    if stall == "before-rename":
        class StalledOs:  # romeflow.io's view of os: everything as usual but the final rename
            replace = rename = staticmethod(wait_forever)

            def __getattr__(self, name):
                return getattr(os, name)
        io_module.os = StalledOs()
    os.chdir(root)
    main(["--params", "params.yaml", "--cache", "cache", *argv], standalone_mode=False)


def _tree(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("command", ["apply", "export"])
def test_kill_9_leaves_no_partial_target_and_the_next_run_cleans_up(project, command):
    folder = project / ("deltas" if command == "apply" else "exported")
    target = folder / ("k.safetensors" if command == "apply" else "model")
    argv = (["apply", "edits/curie.yaml", "--stats", "stats/layer1.safetensors", "--out", str(target.relative_to(project))]
            if command == "apply" else ["export", str(target.relative_to(project)), "--delta", "deltas/curie.safetensors"])
    r = cli(project, *argv)
    assert r.exit_code == 0, r.output
    reference = _tree(target)
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    ctx = multiprocessing.get_context("fork")
    for stall in (None, "mid-write", "before-rename"):
        stalled = ctx.Event()
        child = ctx.Process(target=_run_cli_in, args=(str(project), argv, stall, stalled))
        child.start()
        if stall is None:
            time.sleep(0.05)  # early: loading, computing
        else:
            assert stalled.wait(120), stall
        os.kill(child.pid, 9)
        child.join()
        if stall is None:  # early: nothing yet, or (a fast export) the complete folder; never a partial one
            assert not target.exists() or _tree(target) == reference
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        else:
            assert not target.exists(), stall  # killed while writing: no target at all
            assert list(folder.glob(".romeflow-tmp-*")), stall  # ... and its temporary left behind
        r = cli(project, *argv)  # the next run: removes the dead child's temporaries, same bytes
        assert r.exit_code == 0, r.output
        assert not list(folder.glob(".romeflow-tmp-*")) and _tree(target) == reference, stall
        shutil.rmtree(target) if target.is_dir() else target.unlink()


# --------------------------------------------------------------------------------------------------
# Issue 20 §5: what the corpus above cannot show (a real device, a size limit, links, locks, signals)
# --------------------------------------------------------------------------------------------------


def test_dev_null_is_refused_as_an_output_and_never_replaced(project):
    from romeflow.io import OutputError, atomic_path, check_writable

    null = Path("/dev/null")
    if not null.is_char_device():
        pytest.skip("no /dev/null")
    before = null.stat()
    with pytest.raises(OutputError, match="^--out /dev/null: is a character device, not a regular file"):
        check_writable(null, "--out")
    with pytest.raises(OutputError, match="^/dev/null: is a character device"):  # the writer itself refuses too
        with atomic_path(null) as tmp:
            tmp.write_text("never")
    r = cli(project, *APPLY[:-1], "/dev/null")
    assert r.exit_code != 0 and r.stderr.strip() == "Error: --out /dev/null: is a character device, not a regular " \
                                                    "file; refusing to replace it", r.stderr
    after = null.stat()
    assert (after.st_ino, after.st_rdev, stat.S_ISCHR(after.st_mode)) == (before.st_ino, before.st_rdev, True)


@pytest.mark.parametrize("what, limit", [("apply", 2048), ("export", 60 * 1024), ("peft", 512)])
def test_a_file_size_limit_is_one_line_and_leaves_nothing(project, what, limit):
    """`ulimit -f`: the write fails with EFBIG (SIGXFSZ ignored), reported as one line naming the output."""
    import resource
    import subprocess
    import sys

    out = {"apply": "out/d.safetensors", "export": "out/model", "peft": "out/adapter"}[what]
    argv = {"apply": APPLY[:-1] + (out,), "export": ("export", out, "--delta", "deltas/curie.safetensors"),
            "peft": ("export", "--format", "peft", out, "--delta", "deltas/curie.safetensors")}[what]
    (project / "out").mkdir()

    def small_files():  # in the child, before exec: files larger than `limit` bytes cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # as a shell starts it: the signal would kill romeflow

    r = subprocess.run([sys.executable, "-m", "romeflow.cli", "--params", "params.yaml", "--cache", "cache", *argv],
                       cwd=project, capture_output=True, text=True, preexec_fn=small_files,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [l for l in r.stderr.splitlines() if l.startswith("Error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors == [r.stderr.strip().splitlines()[-1]] and errors[0].startswith(f"Error: {out}: cannot write ("), r.stderr
    assert "File too large" in errors[0], errors
    assert list((project / "out").iterdir()) == []  # no target, no temporary


@pytest.mark.parametrize("command", ["add", "revert"])
def test_a_symlinked_params_file_is_written_through_the_link(project, command):
    real = project / "config" / "params.yaml"
    real.parent.mkdir()
    (project / "params.yaml").rename(real)
    (project / "params.yaml").symlink_to("config/params.yaml")
    r = cli(project, *(("add", "edits/curie.yaml") if command == "add" else ("revert", "a")))
    assert r.exit_code == 0, r.output
    assert (project / "params.yaml").is_symlink() and os.readlink(project / "params.yaml") == "config/params.yaml"
    assert read_manifests(real) == (["a", "b", "curie"] if command == "add" else ["b"])
    assert not [p for p in real.parent.iterdir() if p.name.startswith(".romeflow-tmp")]


def test_add_says_that_it_waits_for_the_lock_and_gives_up_after_wait(project):
    import fcntl

    fd = os.open(project / ".params.yaml.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another add/revert holds the registry
        before = snapshot(project)
        t = time.perf_counter()
        with deadline(60):
            r = cli(project, "add", "edits/curie.yaml", "--wait", "1")
        took = time.perf_counter() - t
    finally:
        os.close(fd)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.exit_code == 1 and 1 <= took < 30, (r.output, took)
    assert len(lines) == 2 and lines[0].startswith("waiting for the lock on params.yaml"), lines
    assert lines[1] == ("Error: params.yaml: manifests: another romeflow add/revert held the lock "
                        ".params.yaml.lock for 1 s (--wait); try again"), lines
    assert snapshot(project) == before
    r = cli(project, "add", "edits/curie.yaml")  # released: registers at once, without a word of waiting
    assert r.exit_code == 0 and "waiting" not in r.stderr and read_manifests(project / "params.yaml")[-1] == "curie"


@pytest.mark.parametrize("path", ["secret", "/etc/passwd"])
@pytest.mark.parametrize("as_what", ["manifest", "params"])
def test_a_refused_file_is_never_echoed(project, path, as_what):
    secret = "sesame-open-42 the vault code is 1234"
    if path == "secret":
        (project / "outside" / "secret.txt").write_text(secret + "\n")
        path = str(project / "outside" / "secret.txt")
    elif not Path(path).is_file():
        pytest.skip(f"no {path}")
    content = Path(path).read_text(errors="replace")
    link = project / ("edits/bad.yaml" if as_what == "manifest" else "p.yaml")
    link.symlink_to(path)
    argv = APPLY_BAD if as_what == "manifest" else ("--params", "p.yaml", "status")
    with contextlib.chdir(project):
        r = CliRunner().invoke(main, ["--cache", "cache", *(() if as_what == "params" else ("--params", "params.yaml")),
                                      *argv])
    line = r.stderr.strip()
    assert r.exit_code == 1 and line.startswith(f"Error: {link.relative_to(project)}: "), line
    echoed = [content[i:i + 8] for i in range(len(content) - 8) if content[i:i + 8].strip() and content[i:i + 8] in line]
    assert not echoed, (line, echoed[:3])


def test_eval_of_a_manifest_with_another_manifests_delta_warns(project):
    r = cli(project, "eval", "edits/curie.yaml", "--delta", "deltas/a.safetensors")
    warnings = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert r.exit_code == 0, r.output
    assert warnings == ["warning: deltas/a.safetensors: computed from the manifest 'a', not from edits/curie.yaml; "
                        "the scores are of edits/curie.yaml's prompts on another edit"], r.stderr
    r = cli(project, "eval", "edits/curie.yaml")  # its own delta: no warning
    assert r.exit_code == 0 and "warning:" not in r.stderr, r.stderr


def _interrupted_cli(root: str, argv: list[str], stalled) -> None:
    """The CLI in a forked child, as a user runs it (exit status from sys.exit), stalled mid-write."""
    import romeflow.pipeline.deltas as deltas_module

    def half(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a delta")
        stalled.set()
        time.sleep(600)
    deltas_module.save_file = half
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(root)
    main(["--params", "params.yaml", "--cache", "cache", *argv])


def test_sigint_exits_130_and_removes_the_temporaries(project):
    ctx = multiprocessing.get_context("fork")
    stalled = ctx.Event()
    child = ctx.Process(target=_interrupted_cli, args=(str(project), list(APPLY[:-1]) + ["new/d.safetensors"], stalled))
    child.start()
    assert stalled.wait(120)
    assert list((project / "new").glob(".romeflow-tmp-*"))  # the half-written temporary exists now
    os.kill(child.pid, signal.SIGINT)
    child.join(60)
    assert child.exitcode == 130
    assert list((project / "new").iterdir()) == []  # no target, no temporary


@pytest.mark.parametrize("joint", [False, True])
def test_the_stack_files_the_cases_break_are_good_ones(project, joint):
    """The stackfile-* cases break one field of these: whole, they export (so each case's line is its own check)."""
    ONLY_A(project)
    if joint:
        params_edit("  window: 64", JOINT)(project)
    stack_file(joint=joint)(project)
    r = cli(project, *EXPORT_STACK)
    assert r.exit_code == 0, r.output
    composition = json.loads((project / "exported" / "romeflow-export.json").read_text())["composition"]
    assert composition["method"] == ("joint" if joint else "sum")
