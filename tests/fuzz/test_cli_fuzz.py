"""Fuzz the command line in-process: random and malformed argument lists to ``survey_utils.cli.main``.

Every run ends with exit code 0 (an answer on stdout; valid JSON with ``--json``) or 2 (exactly one
line, ``error: ...``, on stderr); never a traceback, never another exception, never another code.

Arguments are built from the real vocabulary (zoo models, registered methods and their hyper-parameter
names, every option and choice) mixed with wrong values (negative, huge, NaN, unknown names, paths to
missing or corrupt config files, broken ``--set``), then mangled (tokens dropped, repeated, swapped, or
replaced by random text). Commands that write files get a temporary ``--out`` and a name no chapter or
figure has; ``--simulate`` and the built-model implementations run only on the tiny models (seconds
otherwise; tests/memory and tests/methods cover them).
"""

from __future__ import annotations

import json
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given

from survey_utils.cli import main
from survey_utils.methods import get_method, list_methods
from survey_utils.zoo import list_models
from tests.fuzz._settings import FUZZ, Counter, run_counted

pytestmark = pytest.mark.filterwarnings("ignore")

MODELS = list_models()
TINY = [m for m in MODELS if m.startswith("tiny-")]
METHODS = [m.name for m in list_methods()]
NUMBERS = st.one_of(st.integers(-3, 3), st.integers(1, 4096), st.integers(-10**15, 10**15),
                    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "1_000", "", " ", "3.5", "-0"]))
JUNK = st.text(max_size=12)


def mostly(draw: st.DrawFn, good: st.SearchStrategy, bad: st.SearchStrategy, tenths: int = 8):
    """``good`` in ``tenths`` of ten draws, else ``bad``: valid runs stay common enough to check outputs."""
    return draw(good) if draw(st.integers(0, 9)) < tenths else draw(bad)


def _word(value: object) -> str:
    return value if isinstance(value, str) else str(value)


@st.composite
def settings(draw: st.DrawFn, method: str) -> list[str]:
    """``--set name=value`` pairs: the method's names with good and bad values, unknown names, no '='."""
    names = [h.name for h in get_method(method).hyperparams] if method in METHODS else []
    out: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 9))
        name = draw(st.sampled_from(names)) if names and kind < 7 else draw(JUNK)
        plausible = st.one_of(st.integers(1, 64).map(str), st.sampled_from(
            ["true", "false", "none", "q_proj,v_proj", "all-linear", ".*", "0,1,2", "c_attn", "query,value", "0.5"]))
        value = mostly(draw, plausible, st.one_of(NUMBERS.map(_word), JUNK, st.just("[")), 6)
        out += ["--set", f"{name}={value}" if kind != 9 else name]
    return out


LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def _config_files(tmp: Path) -> list[str]:
    """Paths a user may pass as --model: missing, empty, corrupt, not an object, no model_type, bad type."""
    files = {"empty.json": "", "corrupt.json": "{\"model_type\": ", "list.json": "[1, 2]",
             "no_type.json": json.dumps({"hidden_size": 8}),
             "no_arch.json": json.dumps({"model_type": "llama", "hidden_size": 8}),
             "bad_type.json": json.dumps({"model_type": "not-a-model", "architectures": ["X"]}),
             "bad_values.json": json.dumps({**LLAMA, "hidden_size": -8, "num_attention_heads": 3}),
             "negative_hidden.json": json.dumps({**LLAMA, "hidden_size": -8, "num_attention_heads": 2}),
             "zero_heads.json": json.dumps({**LLAMA, "hidden_size": 8, "num_attention_heads": 0}),
             "text_hidden.json": json.dumps({**LLAMA, "hidden_size": "big"}),
             "null_mlp.json": json.dumps({**LLAMA, "intermediate_size": None}),
             "no_layers.json": json.dumps({**LLAMA, "num_hidden_layers": 0}),
             "latin1.json": "\xff\xfe{}"}
    paths = []
    for name, text in files.items():
        path = tmp / name
        path.write_bytes(text.encode("latin-1"))
        paths.append(str(path))
    return paths + [str(tmp / "missing.json"), str(tmp), str(tmp / "sub" / "config")]


@st.composite
def argv(draw: st.DrawFn, tmp: Path, config_files: list[str]) -> list[str]:
    command = draw(st.sampled_from(["count", "memory", "models", "methods", "figures", "build-notebooks",
                                    "search", "advise", "junk", "none"]))
    args: list[str] = []
    if command in ("count", "memory"):
        model = mostly(draw, st.sampled_from(MODELS), st.one_of(st.sampled_from(config_files), JUNK))
        method = mostly(draw, st.sampled_from(METHODS), JUNK)
        args = [command, "--model", model, "--method", method, *draw(settings(method))]
        if draw(st.booleans()):
            args.append("--json")
        if command == "count":
            implementation = draw(st.sampled_from(["formula", "formula", "scratch", "peft", "bogus"]))
            if implementation in ("scratch", "peft") and model not in TINY:
                implementation = "formula"
            args += ["--implementation", implementation]
        else:
            for option, values in (("--batch-size", st.one_of(st.integers(1, 16).map(str), NUMBERS.map(_word))),
                                   ("--seq-len", st.one_of(st.integers(16, 2048).map(str), NUMBERS.map(_word))),
                                   ("--dtype", st.sampled_from(["fp32", "bf16", "fp16", "fp8", "BF16", ""])),
                                   ("--adapter-dtype", st.sampled_from(["fp32", "bf16", "fp16", "int4"])),
                                   ("--optimizer", st.sampled_from(["adamw", "adamw8bit", "sgd", "adafactor",
                                                                   "adam"])),
                                   ("--quantization", st.sampled_from(["nf4", "int8", "fp4"])),
                                   ("--attention", st.sampled_from(["sdpa", "eager", "flash"]))):
                if draw(st.booleans()):
                    args += [option, draw(values)]
            if draw(st.booleans()):
                args.append("--gradient-checkpointing")
            if model in TINY and draw(st.integers(0, 9)) == 0:
                args.append("--simulate")
    elif command == "search":
        model = mostly(draw, st.sampled_from(TINY), st.one_of(st.sampled_from(config_files), JUNK))
        budget = st.one_of(st.integers(-10, 10**7).map(str), st.floats(-5, 200).map(lambda f: f"{f}%"), JUNK)
        memory = st.one_of(st.sampled_from(["1GiB", "24GiB", "16GB", "0GB", "-3GiB", "nanGB", "infGiB"]), JUNK)
        args = [command, "--model", model, "--trainable-budget", draw(budget), "--memory-budget", draw(memory)]
        if draw(st.booleans()):
            args += ["--seq-len", draw(st.one_of(st.integers(-4, 4096).map(str), JUNK))]
        if draw(st.booleans()):
            args.append("--json")
    elif command == "advise":
        model = mostly(draw, st.sampled_from(TINY), st.one_of(st.sampled_from(config_files), JUNK))
        args = [command, "--model", model, "--gpu-memory",
                draw(st.one_of(st.sampled_from(["24GB", "80GiB", "0GB", "-1GB", "nanGB"]), JUNK))]
        if draw(st.booleans()):
            args += ["--gpus", draw(st.one_of(st.integers(-2, 16).map(str), JUNK))]
        if draw(st.booleans()):
            args += ["--method", mostly(draw, st.sampled_from(METHODS), JUNK)]
        if draw(st.booleans()):
            args += ["--sharding", draw(st.sampled_from(["ddp", "zero3", "fsdp_full_shard", "bogus"]))]
    elif command in ("models", "methods"):
        args = [command] + (["--json"] if draw(st.booleans()) else [])
    elif command == "figures":
        args = [command, "--out", str(tmp / "figures")]
        args += ["--list"] if draw(st.booleans()) else ["--only", "zz" + draw(JUNK)]
    elif command == "build-notebooks":
        args = [command, "--out", str(tmp / "chapters"), "--only", "zz" + draw(JUNK)]
    elif command == "junk":
        args = draw(st.lists(JUNK, max_size=6))
    # mangle: drop, repeat, swap or replace tokens, or add a help flag / an unknown option
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if not args:
            break
        i = draw(st.integers(0, len(args) - 1))
        how = draw(st.sampled_from(["drop", "repeat", "swap", "replace", "unknown", "help"]))
        if how == "drop":
            del args[i]
        elif how == "repeat":
            args.insert(i, args[i])
        elif how == "swap" and i + 1 < len(args):
            args[i], args[i + 1] = args[i + 1], args[i]
        elif how == "replace":
            args[i] = draw(JUNK)
        elif how == "unknown":
            args.insert(i, "--" + draw(st.text(alphabet="abcdefgh-", min_size=1, max_size=8)))
        elif how == "help":
            args.insert(i, draw(st.sampled_from(["-h", "--help"])))
    # a chapter or figure name must never be reached by a mangled --only: keep the 'zz' guard in place
    for flag in ("--only",):
        if flag in args and args.index(flag) + 1 < len(args) and not args[args.index(flag) + 1].startswith("zz"):
            args.insert(args.index(flag) + 1, "zz")
    if "build-notebooks" in args and "--only" not in args:
        args = [a for a in args if a != "build-notebooks"] or ["--help"]
    if "figures" in args and "--list" not in args and "--only" not in args:
        args.append("--list")
    return args


def test_cli_fuzz(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a mangled argv that lost its --out writes here, not into the repository
    config_files = _config_files(tmp_path)

    @FUZZ
    @given(data=st.data())
    def fuzz(counter: Counter, data: st.DataObject) -> None:
        counter()
        args = data.draw(argv(tmp_path, config_files), label="argv")
        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse: usage errors (2) and --help (0)
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, f"{args}: a traceback was printed:\n{err}"
        assert code in (0, 2), f"{args}: exit code {code!r}\nstderr: {err}"
        counter.event(f"exit {code}")
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1, f"{args}: exit 2 with {len(lines)} lines on stderr:\n{err}"
            assert lines[0].startswith("error: "), f"{args}: {lines[0]!r}"
        else:
            assert out.strip(), f"{args}: exit 0 with nothing on stdout"
            if "--json" in args and not out.startswith("usage:"):  # --help (or --he, --h) prints usage
                json.loads(out)

    run_counted("CLI", fuzz)


# What the fuzz found, pinned: bad config files and line breaks inside an argument must still give
# exit 2 and one line.
@pytest.mark.parametrize("config", ["bad_values.json", "negative_hidden.json", "zero_heads.json",
                                    "text_hidden.json", "null_mlp.json", "no_layers.json", "corrupt.json",
                                    "latin1.json", "no_arch.json"])
def test_bad_config_file_is_one_line(config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = dict((Path(p).name, p) for p in _config_files(tmp_path))[config]
    code = main(["count", "--model", path, "--method", "lora"])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (code, out, err)


@pytest.mark.parametrize("token", ["\r", "a\nb", "\x85", "\u2028"])
def test_line_break_in_argument_is_one_line(token: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["models", token])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, repr(err)
