"""``python -m survey_utils``: count, memory, advise, search, models, methods, figures, build-notebooks.

Bad input prints one line, ``error: ...`` naming the bad value, on stderr and exits 2; never a traceback.

Cold start: the arguments are parsed before anything heavy is imported, and each command imports what it
needs inside its function. torch, transformers and peft belong to the commands that build models
(``count --implementation scratch|peft``, ``memory --simulate``, ``figures``, ``build-notebooks``); configs are
read by :mod:`survey_utils.zoo` without them. ``benchmarks/cold_start.py`` times every command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from survey_utils.errors import SurveyError
from survey_utils.units import DTYPES, OPTIMIZERS, QUANTIZATIONS


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (argparse prints the whole usage by default)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see '{self.prog} --help')\n")


def _add_model_method(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="zoo name (see `models`) or a path to a config.json")
    parser.add_argument("--method", required=True, help="registered method (see `methods`)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="hyper-parameter, repeatable; lists are comma-separated (target_modules=q_proj,v_proj)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m survey_utils", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    count = commands.add_parser("count", help="trainable and total parameters of a model under a method")
    _add_model_method(count)
    count.add_argument("--implementation", default="formula", choices=("formula", "scratch", "peft"),
                       help="closed form (default), our from-scratch method on a meta model, or HF peft")

    memory = commands.add_parser("memory", help="peak memory of one training step, term by term")
    _add_model_method(memory)
    memory.add_argument("--batch-size", type=int, default=1)
    memory.add_argument("--seq-len", type=int, default=512)
    memory.add_argument("--dtype", default="bf16", choices=DTYPES)
    memory.add_argument("--adapter-dtype", default=None, choices=DTYPES,
                        help="dtype of the parameters the method adds (default: --dtype)")
    memory.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    memory.add_argument("--gradient-checkpointing", action="store_true")
    memory.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    memory.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    memory.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="kernels the estimate counts (cpu: those the simulation runs)")
    memory.add_argument("--simulate", action="store_true", help="also run the step on fake tensors")

    advise = commands.add_parser("advise", help="what fits N GPUs: every method's fit, batch, length, sharding")
    advise.add_argument("--model", required=True, help="zoo name (see `models`) or a path to a config.json")
    advise.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="memory of one GPU with its unit: 48GB (10^9 B) or 48GiB (2^30 B)")
    advise.add_argument("--gpu", default=None, metavar="NAME", help="a GPU of data/gpus.csv instead of --gpu-memory")
    advise.add_argument("--gpus", type=int, default=1, help="number of GPUs (default 1)")
    advise.add_argument("--seq-len", type=int, default=None, help="sequence length (default: 2048 or the context)")
    advise.add_argument("--sharding", default=None,
                        help="force one strategy: ddp, zero1, zero2, zero3, fsdp_shard_grad_op, fsdp_full_shard")
    advise.add_argument("--method", dest="methods", action="append", default=None,
                        help="only this method (repeatable; default: every registered method)")
    advise.add_argument("--json", action="store_true", help="print one JSON object (its rows: one per method)")

    search = commands.add_parser("search", help="chapter 05's budgeted design search: the Pareto front of hybrids")
    search.add_argument("--model", required=True, help="zoo name (see `models`) or a path to a config.json")
    search.add_argument("--trainable-budget", required=True, metavar="N|P%",
                        help="most trainable parameters: a count (2000000) or a percent of the model (1%%)")
    search.add_argument("--memory-budget", required=True, metavar="SIZE",
                        help="most peak memory of one training step, with its unit: 24GiB or 16GB")
    search.add_argument("--batch-size", type=int, default=8)
    search.add_argument("--seq-len", type=int, default=128)
    search.add_argument("--dtype", default="bf16", choices=DTYPES)
    search.add_argument("--json", action="store_true", help="print one JSON object (the front and named points)")

    models = commands.add_parser("models", help="list the model zoo")
    models.add_argument("--json", action="store_true")
    methods = commands.add_parser("methods", help="list the registered methods")
    methods.add_argument("--json", action="store_true")

    figures = commands.add_parser("figures", help="regenerate the survey figures")
    figures.add_argument("--out", default="figures")
    figures.add_argument("--only", nargs="+", default=None, metavar="NAME")
    figures.add_argument("--list", action="store_true", help="list the figures and exit")

    notebooks = commands.add_parser("build-notebooks", help="execute every chapter into .ipynb files")
    notebooks.add_argument("--out", default="_build/notebooks")
    notebooks.add_argument("--only", nargs="+", default=None, metavar="CHAPTER")
    return parser


# --set names that edit the model's config rather than the method (a task head's number of outputs).
_CONFIG_SETTINGS = ("num_labels",)


def _split_config_settings(settings: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``--set`` items for the method, and those of :data:`_CONFIG_SETTINGS` (``num_labels=5``) for the config."""
    method_settings, config_settings = [], {}
    for item in settings:
        name, _, value = item.partition("=")
        if name.strip() in _CONFIG_SETTINGS and "=" in item:
            config_settings[name.strip()] = value
        else:
            method_settings.append(item)
    return method_settings, config_settings


def _cmd_count(args: argparse.Namespace) -> int:
    from survey_utils.architecture import with_num_labels
    from survey_utils.counting import count, model_name
    from survey_utils.methods import get_method
    from survey_utils.zoo import load_config

    method = get_method(args.method)
    settings, config_settings = _split_config_settings(args.settings)
    overrides = method.parse_settings(settings)
    model = args.model
    if "num_labels" in config_settings:  # a task head's outputs: a copy of the config with num_labels set
        model = with_num_labels(load_config(args.model), config_settings["num_labels"])
    result = count(model, method, args.implementation, **overrides)
    if args.json:
        active = {} if result.active is None else {"active": result.active}  # MoE: parameters a token uses
        print(json.dumps({"trainable": result.trainable, "total": result.total,
                          "trainable_percent": result.trainable_percent, **active, **result.task_head_dict()}))
    else:
        print(f"model {model_name(model)}  method {method.name}  ({args.implementation})")
        print(f"trainable  {result.trainable:>18,}")
        print(f"total      {result.total:>18,}")
        print(f"trainable% {result.trainable_percent:>18.4f}")
        if result.active is not None:
            print(f"active     {result.active:>18,}  (per token: routers, shared and top-k routed experts)")
        if result.task_type is not None:
            head = ", ".join(result.task_head) or "none that peft matches"
            print(f"task head  {result.head_trainable:>18,}  ({result.task_type}: {head}; trainable beside the "
                  "method, in peft's modules_to_save)")
            if result.peft_total is not None:
                print(f"peft total {result.peft_total:>18,}  (what print_trainable_parameters prints as all params)")
            note = result.peft_note()
            if note:
                print(note)
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    from survey_utils.memory import cli_memory

    return cli_memory(args)


def _cmd_advise(args: argparse.Namespace) -> int:
    from survey_utils.advisor import advise, format_advice, gpu_memory_of

    memory = gpu_memory_of(args.gpu_memory, args.gpu)
    advice = advise(args.model, memory, gpus=args.gpus, seq_len=args.seq_len, methods=args.methods,
                    sharding=args.sharding)
    print(json.dumps(advice.as_dict()) if args.json else format_advice(advice))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from survey_utils.experiments.ch05_hybrid import (
        format_search,
        parse_memory_budget,
        parse_trainable_budget,
        search,
    )
    from survey_utils.zoo import load_config

    config = load_config(args.model)
    result = search(config, parse_trainable_budget(args.trainable_budget, config),
                    parse_memory_budget(args.memory_budget), batch_size=args.batch_size, seq_len=args.seq_len,
                    dtype=args.dtype)
    print(json.dumps(result.as_dict()) if args.json else format_search(result))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from survey_utils.zoo import list_models, zoo_row

    rows = [zoo_row(name) for name in list_models()]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            total = f"{row['total']:>16,}" if row["total"] is not None else f"{'(not recorded)':>16}"
            print(f"{row['name']:<16} {row['architecture']:<28} {total}  "
                  f"{row['layers']:>3} blocks  hidden {row['hidden']}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from survey_utils.methods import list_methods

    rows = [{"name": m.name, "title": m.title, "family": m.family, "arxiv": m.arxiv_id, "chapter": m.chapter,
             "peft": m.peft_config is not None,
             "hyperparams": {hp.name: hp.default for hp in m.hyperparams}} for m in list_methods()]
    if args.json:
        print(json.dumps(rows))
    else:
        for row in rows:
            print(f"{row['name']:<18} {row['family']:<16} peft={'yes' if row['peft'] else 'no ':<3}  {row['title']}")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from survey_utils.figures import cli_figures

    return cli_figures(args)


def _cmd_build_notebooks(args: argparse.Namespace) -> int:
    from survey_utils.notebooks import build_all

    build_all(args.out, only=args.only)
    return 0


_COMMANDS: dict[str, Any] = {
    "count": _cmd_count, "memory": _cmd_memory, "advise": _cmd_advise, "search": _cmd_search, "models": _cmd_models,
    "methods": _cmd_methods,
    "figures": _cmd_figures, "build-notebooks": _cmd_build_notebooks,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except SurveyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `models | head` closed the pipe early: nothing went wrong; silence the flush at exit (Python's docs'
        # recipe, "Note on SIGPIPE")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
