"""``boft_triton.tuning`` end to end: shapes from a model, timing, the JSON cache, and the kernel
launchers picking the cached tile.

Without CUDA the kernels run in Triton's interpreter; ``TRITON_INTERPRET`` must be set before
any ``@triton.jit`` decorator runs (before ``boft_triton.kernels.*`` is imported), hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import boft_triton  # noqa: E402,F401
from boft_triton import torch_ops, tuning  # noqa: E402

kb = importlib.import_module("boft_triton.kernels.butterfly")
kcommon = importlib.import_module("boft_triton.kernels._common")

pytestmark = pytest.mark.kernels
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Adapted(nn.Module):
    """Stands in for an adapted layer: a base layer and a ``boft_R`` ParameterDict."""

    def __init__(self, n, o, b, N, dtype=torch.float32):
        super().__init__()
        self.base_layer = nn.Linear(n, o, dtype=dtype)
        self.boft_R = nn.ParameterDict({"default": nn.Parameter(torch.zeros(N, n // b, b, b))})


def test_collect_shapes():
    model = nn.Sequential(
        Adapted(16, 8, 4, 2), nn.ReLU(), Adapted(16, 8, 4, 2), Adapted(24, 4, 6, 1, torch.bfloat16), nn.Linear(4, 4)
    )
    assert tuning.collect_shapes(model) == [(16, 4, 2, torch.float32), (24, 6, 1, torch.bfloat16)]


def test_default_cache_path(monkeypatch):
    platformdirs = pytest.importorskip("platformdirs")  # the GPU image lacks it (then launches warn: below)

    monkeypatch.delenv(tuning.CACHE_ENV, raising=False)
    assert tuning.cache_path().parent == type(tuning.cache_path())(platformdirs.user_cache_dir("boft_triton"))
    monkeypatch.setenv(tuning.CACHE_ENV, "/tmp/x.json")
    assert str(tuning.cache_path()) == "/tmp/x.json"


def test_tune_writes_cache_and_launcher_uses_it(cache_file, capsys):
    model = nn.Sequential(Adapted(24, 8, 4, 2), Adapted(15, 8, 5, 1))
    shapes = tuning.collect_shapes(model)
    rows = tuning.tune(shapes, tokens_per_step=9, dtype=torch.float32, device=DEVICE, max_configs=3)
    assert {(r["n"], r["b"], r["N"], r["kind"]) for r in rows} == {
        (24, 4, 2, "fwd"), (24, 4, 2, "bwd"), (15, 5, 1, "fwd"), (15, 5, 1, "bwd")
    }
    assert all(r["time_ms"] > 0 and r["gbps"] > 0 and r["path"].startswith("dot") for r in rows)
    printed = capsys.readouterr().out
    assert "n24-b4-N2" in printed and "GB/s" in printed
    table = tuning.format_table(rows)
    assert table.count("\n") == len(rows) and "n15-b5-N1" in table

    # the cache: one entry per shape, keyed by device, Triton version, dtype and shape
    data = json.loads(cache_file.read_text())
    assert data["format"] == tuning.CACHE_FORMAT
    key = tuning.cache_key(kcommon.device_name(DEVICE), kcommon.TRITON_VERSION, torch.float32, 24, 4, 2)
    assert set(data["entries"]) == {key, tuning.cache_key(kcommon.device_name(DEVICE), kcommon.TRITON_VERSION, torch.float32, 15, 5, 1)}
    entry = data["entries"][key]
    assert entry["fwd"] == next(r["config"] for r in rows if r["n"] == 24 and r["kind"] == "fwd")
    assert not [p for p in cache_file.parent.iterdir() if p.name.startswith(".tune-")]  # no temp left

    # the launchers read it (memoised) and use the cached tile for this shape, in both directions
    Q = torch_ops.cayley(torch.randn(2, 6, 4, 4)).to(DEVICE).requires_grad_()
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    y = kb.butterfly(x, Q)
    assert kb.LAST_LAUNCH["butterfly_fwd"] == ("cache", entry["fwd"])
    y.backward(torch.randn_like(y))
    assert kb.LAST_LAUNCH["butterfly_bwd"] == ("cache", entry["bwd"])
    # another dtype is another key: not in the cache
    kb.butterfly(x.detach().bfloat16(), Q.detach())
    assert kb.LAST_LAUNCH["butterfly_fwd"][0] != "cache"


def test_tune_times_a_one_pass_prefix_under_its_own_key(cache_file):
    """80x3 runs its two low levels as a one-pass prefix (an 80x2 butterfly) and its top level as
    a pass of its own: tuning times the prefix's tiles under its own key and the shape's with
    those of its own kernels, and caches both; a forced tile reaches only its key's kernels."""
    rows = tuning.tune([(320, 80, 3)], tokens_per_step=9, dtype=torch.bfloat16, device=DEVICE, max_configs=1)
    assert [(r["N"], r["kind"]) for r in rows] == [(2, "fwd"), (2, "bwd"), (3, "fwd"), (3, "bwd")]
    assert rows[0]["path"].startswith("fused128+128") and rows[2]["path"].startswith("dot128+fused128+128")
    data = json.loads(cache_file.read_text())
    name = kcommon.device_name(DEVICE)
    assert set(data["entries"]) == {tuning.cache_key(name, kcommon.TRITON_VERSION, torch.bfloat16, 320, 80, N)
                                    for N in (2, 3)}
    assert tuning.count_candidates([(320, 80, 3)], max_configs=1) == 4
    tile = {"BT": 32, "PPS": 2, "num_warps": 4, "num_stages": 2}
    with kb.forced_config("fwd", tile, (320, 80, 3)):
        assert kb.pick_config("fwd", 320, 80, 3, torch.bfloat16, DEVICE) == ("forced", tile)
        assert kb.pick_config("fwd", 320, 80, 2, torch.bfloat16, DEVICE)[0] == "cache"


def test_cached_config_is_what_runs(cache_file):
    """A hand-written entry with a non-default tile is the one launched, and gives the same maths;
    a later tune merges into the file instead of replacing it."""
    n, b, N = 24, 4, 2
    odd = {"fwd": {"BT": 32, "PPS": 1, "num_warps": 8, "num_stages": 2}, "bwd": {"num_warps": 8, "num_stages": 3}}
    key = tuning.cache_key(kcommon.device_name(DEVICE), kcommon.TRITON_VERSION, torch.float32, n, b, N)
    cache_file.write_text(json.dumps({"format": tuning.CACHE_FORMAT, "entries": {key: odd}}))
    tuning.clear_memo()
    assert odd["fwd"] != kb.default_config(n, b, N, "fwd")
    Q = torch_ops.cayley(torch.randn(N, n // b, b, b)).to(DEVICE).requires_grad_()
    x = torch.randn(7, n, device=DEVICE, requires_grad=True)
    y = kb.butterfly(x, Q)
    assert kb.LAST_LAUNCH["butterfly_fwd"] == ("cache", odd["fwd"])
    g = torch.randn_like(y)
    dx, dQ = torch.autograd.grad(y, (x, Q), g)
    assert kb.LAST_LAUNCH["butterfly_bwd"] == ("cache", odd["bwd"])
    yt = torch_ops.butterfly(x, Q)
    dxt, dQt = torch.autograd.grad(yt, (x, Q), g)
    for a, ref in ((y, yt), (dx, dxt), (dQ, dQt)):
        assert ((a - ref).norm() / ref.norm()).item() <= 1e-5

    tuning.tune([(16, 4, 1)], tokens_per_step=4, dtype=torch.float32, device=DEVICE, max_configs=1, verbose=False)
    entries = json.loads(cache_file.read_text())["entries"]
    assert entries[key] == odd and len(entries) == 2


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each problem with the cache is said once per process: start from none said."""
    monkeypatch.setattr(tuning, "_WARNED", set())
    tuning.default_cache_path.cache_clear()
    tuning.clear_memo()
    yield
    tuning.default_cache_path.cache_clear()
    tuning.clear_memo()


def _no_platformdirs(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning.CACHE_ENV)
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # import raises ImportError


def _no_home(monkeypatch, tmp_path):
    pytest.importorskip("platformdirs")  # without it: the no-platformdirs case
    monkeypatch.delenv(tuning.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "no-such-home"))


def _unreadable(monkeypatch, tmp_path):
    path = Path(os.environ[tuning.CACHE_ENV])
    path.write_text(json.dumps({"format": tuning.CACHE_FORMAT, "entries": {}}))
    real = Path.read_bytes

    def denied(self):  # chmod 000 does not stop root, who runs CI: refuse the read itself
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)


def _write(content):
    def make(monkeypatch, tmp_path):
        Path(os.environ[tuning.CACHE_ENV]).write_bytes(content)
    return make


def _folder(monkeypatch, tmp_path):
    Path(os.environ[tuning.CACHE_ENV]).mkdir()


def _bad_entry(entry):
    def make(monkeypatch, tmp_path):
        key = tuning.cache_key(kcommon.device_name(DEVICE), kcommon.TRITON_VERSION, torch.float32, 16, 4, 1)
        Path(os.environ[tuning.CACHE_ENV]).write_text(json.dumps({"format": tuning.CACHE_FORMAT, "entries": {key: entry}}))
    return make


CACHE_PROBLEMS = {
    "missing": (lambda monkeypatch, tmp_path: None, "no tuning cache at"),
    "no-platformdirs": (_no_platformdirs, "platformdirs is not installed"),
    "no-home-directory": (_no_home, "no tuning cache at"),
    "unreadable": (_unreadable, "Permission denied"),
    "folder": (_folder, "is a folder"),
    "corrupt": (_write(b"{not json"), "not valid JSON"),
    "not-utf8": (_write(b"\xff\xfe\x00garbage"), "not valid JSON"),
    "other-format": (_write(b'{"format": 99, "entries": {}}'), "not a boft_triton tuning cache"),
    "entries-not-a-dict": (_write(json.dumps({"format": tuning.CACHE_FORMAT, "entries": [1, 2]}).encode()),
                           "not a boft_triton tuning cache"),
    "older-kernels": (_write(b'{"format": 1, "entries": {}}'), "run `boft-triton tune` again"),
    "entry-not-a-dict": (_bad_entry("BT=64"), "malformed entry"),
    "tile-not-an-int": (_bad_entry({"fwd": {"BT": "64", "PPS": 4, "num_warps": 4}}), "malformed"),
    "tile-not-a-power-of-two": (_bad_entry({"fwd": {"BT": 48, "PPS": 4, "num_warps": 4}}), "malformed"),
    "tile-missing-a-key": (_bad_entry({"fwd": {"BT": 64, "num_warps": 4}}), "malformed"),
}


@pytest.mark.parametrize("problem", list(CACHE_PROBLEMS))
def test_a_launch_never_fails_because_of_the_cache(problem, cache_file, fresh_warnings, monkeypatch, tmp_path):
    """Whatever is wrong with the tuning cache or finding it, a kernel launch takes the default
    tile, computes the right thing and warns once, saying what is wrong."""
    make, says = CACHE_PROBLEMS[problem]
    make(monkeypatch, tmp_path)
    Q = torch_ops.cayley(torch.randn(1, 4, 4, 4)).to(DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    with pytest.warns(tuning.TuneCacheWarning) as caught:
        y = kb.butterfly(x, Q)
    messages = [str(w.message) for w in caught if issubclass(w.category, tuning.TuneCacheWarning)]
    assert len(messages) == 1 and says in messages[0], messages
    assert kb.LAST_LAUNCH["butterfly_fwd"] == ("default", kb.default_config(16, 4, 1, "fwd", torch.float32))
    assert ((y - torch_ops.butterfly(x, Q)).norm() / y.norm()).item() <= 1e-5
    with warnings.catch_warnings():  # once: the next launch is silent
        warnings.simplefilter("error", tuning.TuneCacheWarning)
        tuning.clear_memo()
        kb.butterfly(x, Q)


def test_writing_the_cache_fails_clearly(cache_file, fresh_warnings, monkeypatch, tmp_path):
    """``tune`` may fail to write, but says which file and what to do; nothing half-written stays."""
    shape = [(16, 4, 1)]
    cache_file.mkdir()
    with pytest.raises(tuning.TuneCacheError, match="is a folder.*--cache FILE"):
        tuning.tune(shape, tokens_per_step=4, dtype=torch.float32, device=DEVICE, max_configs=1, verbose=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(tuning.TuneCacheError, match="cannot write the tuning cache .*a-file/tune.json"):
        tuning.tune(shape, tokens_per_step=4, dtype=torch.float32, device=DEVICE, max_configs=1, verbose=False,
                    cache_path=blocker / "tune.json")
    _no_platformdirs(monkeypatch, tmp_path)
    with pytest.raises(tuning.TuneCacheError, match="pip install platformdirs, or set BOFT_TRITON_TUNE_CACHE"):
        tuning.tune(shape, tokens_per_step=4, dtype=torch.float32, device=DEVICE, max_configs=1, verbose=False)


def test_a_corrupt_cache_is_replaced_when_tuning(cache_file, fresh_warnings):
    cache_file.write_text("{not json")
    with pytest.warns(tuning.TuneCacheWarning, match="replacing it"):
        tuning.tune([(16, 4, 1)], tokens_per_step=4, dtype=torch.float32, device=DEVICE, max_configs=1, verbose=False)
    assert len(json.loads(cache_file.read_text())["entries"]) == 1


_LAUNCH_SCRIPT = """
import json, os, sys
import torch
from boft_triton import torch_ops
from boft_triton.kernels import butterfly as kb
device = "cuda" if torch.cuda.is_available() else "cpu"
Q = torch_ops.cayley(torch.randn(2, 8, 4, 4)).to(device)  # n=32, b=4, N=2: the tiny BERT's adapted shape
kb.butterfly(torch.randn(3, 32, device=device), Q)
print(json.dumps(kb.LAST_LAUNCH["butterfly_fwd"]))
"""


def _fresh_process(args, env, cwd):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _launch_source(env, cwd):
    """(source, config) of a butterfly forward launched in a new process with ``env``."""
    return tuple(json.loads(_fresh_process(["-c", _LAUNCH_SCRIPT], env, cwd).splitlines()[-1]))


@pytest.mark.slow
def test_tune_command_then_a_new_process_launches_with_the_tuned_tile(tmp_path):
    """`boft-triton tune` on a tiny BERT config, then a kernel launch in a fresh process: without
    --cache the launch reads what tune wrote; with --cache FILE it reads it once given the
    BOFT_TRITON_TUNE_CACHE=FILE that tune prints (and, without it, does not)."""
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
               vocab_size=64).save_pretrained(tmp_path / "tiny-bert")
    env = {k: v for k, v in os.environ.items() if k != tuning.CACHE_ENV}
    # tune without --cache writes the user cache dir, found with platformdirs. Asked of a fresh
    # process: importing setuptools puts its vendored copy on sys.path, so this one may see it.
    import subprocess
    import sys

    if subprocess.run([sys.executable, "-c", "import platformdirs"], env=env, capture_output=True).returncode:
        pytest.skip("platformdirs is not installed (the GPU image lacks it)")
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), HF_HUB_OFFLINE="1")
    if DEVICE.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    tune = ["-m", "boft_triton.cli", "tune", "--model", str(tmp_path / "tiny-bert"), "--targets", "query,value",
            "--block-size", "4", "--factors", "2", "--tokens", "8", "--dtype", "fp32", "--max-configs", "2"]
    key = tuning.cache_key(kcommon.device_name(DEVICE), kcommon.TRITON_VERSION, torch.float32, 32, 4, 2)

    out = _fresh_process(tune, env, tmp_path)  # the default file: the one launches read
    default_file = tmp_path / "xdg" / "boft_triton" / "tune.json"
    assert "kernel launches read this file" in out
    entry = json.loads(default_file.read_text())["entries"][key]
    assert _launch_source(env, tmp_path) == ("cache", entry["fwd"])

    default_file.unlink()
    named = tmp_path / "named.json"
    out = _fresh_process(tune + ["--cache", str(named)], env, tmp_path)
    entry = json.loads(named.read_text())["entries"][key]
    assert _launch_source(env, tmp_path)[0] != "cache"
    assignment = next(line for line in out.splitlines() if f"{tuning.CACHE_ENV}=" in line)
    value = assignment.split(f"{tuning.CACHE_ENV}=", 1)[1].strip()
    assert value == str(named.resolve())
    assert _launch_source({**env, tuning.CACHE_ENV: value}, tmp_path) == ("cache", entry["fwd"])



def _tiny_bert(path):
    from transformers import BertConfig

    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
               vocab_size=64).save_pretrained(path)
    return str(path)


def test_tune_shares_train_defaults(tmp_path):
    """A bare ``tune`` tunes what a bare ``train`` runs (model, targets, block size, factors)."""
    import argparse

    from boft_triton.cli import build_parser
    from boft_triton.cli import tune as tune_cli
    from boft_triton.cli.train import DEFAULT_BLOCK_SIZE

    parser = build_parser()
    tune, train = parser.parse_args(["tune"]), parser.parse_args(["train"])
    for name in ("model", "targets", "block_size", "block_num", "factors"):
        assert getattr(tune, name) == getattr(train, name), name
    model = tune_cli._adapted_model(argparse.Namespace(**{**vars(tune), "model": _tiny_bert(tmp_path / "bert")}))
    shapes = tuning.collect_shapes(model)
    assert shapes and all(b == DEFAULT_BLOCK_SIZE for _, b, _, _ in shapes)


def test_tune_command_refuses_a_full_search_in_the_interpreter(tmp_path, monkeypatch, capsys):
    from boft_triton.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ["tune", "--model", _tiny_bert(tmp_path / "bert"), "--cache", str(tmp_path / "t.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "full search over" in err and "--max-configs 1" in err
    assert not (tmp_path / "t.json").exists()


def test_tune_command_prints_its_table_once_and_shows_progress(tmp_path, monkeypatch, capsys):
    from boft_triton.cli import main

    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = ["tune", "--model", _tiny_bert(tmp_path / "bert"), "--targets", "query", "--block-size", "16",
            "--tokens", "8", "--dtype", "fp32", "--cache", str(tmp_path / "t.json"), "--max-configs", "1"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.count("GB/s") == 1 and captured.out.count("n64-b16-N1") == 2  # header once; fwd + bwd rows
    assert "tuning" in captured.err and "2/2" in captured.err  # the progress bar: shapes x directions x tiles
