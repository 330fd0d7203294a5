"""`dex bench`: ar, every select:J, dex (DECS on and off) and the EAD oracle on
the same prompts; a table, or with --json one object keyed by mode.

With boundary adapters (`--adapters PATH`, or `auto` finding them next to the
model) every mode runs twice, without and with them, and the report sets the
two side by side: each boundary's free-running agreement with the committed
token, RPT, tokens/s and the identical-to-ar check (both against `ar` without
adapters). `--adapters none` reports the one column.

On explorer processes (the default layout where there are cores for them) the
`ar` row is ar on those processes, and `ar-1proc` is plain decoding in one
process with every core's threads, the configuration DEX has to beat: it runs
in turns with `dex`, prompt by prompt, so both see the same spells of a
machine whose speed drifts."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dexserve.launch.engine_options import add_engine_arguments, compile_notice, engine_config

if TYPE_CHECKING:
    from dexserve.engine.engine import DexEngine
    from dexserve.engine.measure import ModeResult


HELP = ("Compare ar, every select:J, dex and the EAD oracle on the same prompts; with boundary adapters, "
        "every mode without and with them, side by side (per-boundary agreement, RPT, tokens/s, identical to ar).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dexserve.launch.report import add_prompt_arguments

    add_engine_arguments(p, modes=False)
    add_prompt_arguments(p, limit=None, model=False)
    p.add_argument("--modes", default=None,
                   help="comma-separated subset, e.g. ar,select:2,dex,dex-nodecs (default: all)")
    p.add_argument("--hf", action="store_true", help="also time Hugging Face generate (greedy)")
    p.add_argument("--hf-layerskip", default=None,
                   help="comma-separated exit layers E for HF generate(assistant_early_exit=E)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the dex run and report where a round's time goes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")


@dataclass
class Variant:
    """One pass over every mode with one adapters setting."""

    adapters: dict | None                 # AdapterInfo.as_dict() of the engine, None: no adapters
    runs: dict[str, "ModeResult"] = field(default_factory=dict)
    extra: dict[str, dict] = field(default_factory=dict)   # ead-oracle, dex-profile
    ar_widths: list[int] = field(default_factory=list)
    compile: bool = False
    single: "ModeResult | None" = None    # ar in one process, in turns with dex (`run_paired`)

    def summaries(self, reference: list[list[int]]) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for mode, r in self.runs.items():
            out[mode] = r.summary(reference)
            if mode == "ar":
                out.update({k: v for k, v in self.extra.items() if k == "ead-oracle"})
        out.update({k: v for k, v in self.extra.items() if k != "ead-oracle"})
        return out


def measure(args: argparse.Namespace, prompts: list[str], modes: list[str], adapters: str,
            single: "DexEngine | None" = None) -> Variant:
    """Every mode on the prompts with one adapters setting (`auto`, `none` or a path).
    `single`: plain decoding in one process, timed in turns with `dex`, prompt by prompt."""
    from dexserve.engine.engine import DexEngine
    from dexserve.engine.measure import Turn, run_mode, run_paired

    def load(mode: str) -> DexEngine:
        # ar is measured as users run it: its steps are one row wide (EngineConfig.widths);
        # the spawning modes share one engine at the configured width
        cfg = engine_config(args, mode=mode)
        cfg.max_batch = 1
        cfg.adapters = adapters
        eng = DexEngine.load(args.model, cfg)
        run_mode(eng, mode, True, prompts[:1], 4)  # warm-up (compilation, allocator) outside the measurement
        return eng

    engine = load("ar")
    v = Variant(adapters=engine.adapters.as_dict() if engine.adapters else None,
                ar_widths=list(engine.executor.spec.widths), compile=engine.config.compile)
    try:
        for mode in modes:
            if mode != "ar" and engine.config.mode == "ar":
                engine.close()
                engine = load("dex")
            decs = mode != "dex-nodecs"
            profiler = None
            if args.profile and mode == "dex":
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            if mode == "dex" and single is not None and profiler is None:
                r, v.single = run_paired([Turn(engine, "dex", threads=engine.config.threads),
                                          Turn(single, "ar", threads=single.config.threads)],
                                         prompts, args.max_new_tokens)
            else:
                r = run_mode(engine, "dex" if mode == "dex-nodecs" else mode, decs, prompts, args.max_new_tokens,
                             with_oracle=(mode == "ar"))
            if profiler is not None:
                profiler.disable()
                v.extra["dex-profile"] = round_profile(profiler, r.stats.rounds)
                if mode == "dex" and single is not None:   # (not in turns: the profile is dex's alone)
                    v.single = run_paired([Turn(single, "ar", threads=single.config.threads)], prompts,
                                          args.max_new_tokens)[0]
            v.runs[mode] = r
            if r.oracle is not None:
                v.extra["ead-oracle"] = {"rpt": r.oracle.rpt, "accept_hist": r.oracle.accept_hist,
                                         "agreement_by_boundary": r.oracle.agreement,
                                         "tokens": r.oracle.commits, "identical_to_ar": True}
            label = "adapters" if v.adapters else "none"
            print(f"[bench] adapters={label} {mode}: rpt={r.stats.rpt} tokens={r.tokens}", file=sys.stderr)
    finally:
        engine.close()
    return v


def run(args: argparse.Namespace) -> int:
    from dexserve.engine.measure import hf_baseline, matmul_floor, side_by_side
    from dexserve.launch.report import emit, prompts_from_args

    from dexserve.contract.model_card import ModelLoadError

    from dexserve.engine.engine import DexEngine

    card, prompts = prompts_from_args(args)
    config = engine_config(args)
    if notice := compile_notice(config):
        print(f"dex bench: {notice}", file=sys.stderr, flush=True)
    layout = DexEngine.laid_out(card, config)     # auto explorers / executor, settled once
    args.explorers, args.executor = layout.explorers, layout.executor
    K = args.explorers
    modes = ["ar"] + [f"select:{j}" for j in range(1, K)] + ["dex", "dex-nodecs"]
    if args.modes:
        modes = ["ar"] + [m for m in args.modes.split(",") if m != "ar"]

    # as configured (--adapters auto|PATH|none); when that finds adapters, the same modes again without
    # them: one run reports both, side by side, against the same `ar` reference (ar without adapters)
    # on explorer processes, `ar` above runs as DEX's explorers do, one process each; plain decoding's
    # own best is one process: timed in turns with dex, prompt by prompt
    single = single_process_ar(args, prompts) if args.executor == "distributed" and "dex" in modes else None
    try:
        configured = measure(args, prompts, modes, args.adapters, single)
        plain = measure(args, prompts, modes, "none") if configured.adapters else configured
    except (ModelLoadError, ValueError) as exc:
        print(f"dex bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if single is not None:
            single.close()
    reference = plain.runs["ar"].outputs
    results = configured.summaries(reference)
    columns = {"none": plain.summaries(reference)}
    if configured.adapters:
        columns["adapters"] = results
    if configured.single is not None:
        results["ar-1proc"] = configured.single.summary(reference)
    if args.hf:
        s, n, outs = hf_baseline(card.path, prompts, args.max_new_tokens)
        results["hf-generate"] = {"tokens_per_s": round(n / s, 2), "tokens": n, "identical_to_ar": outs == reference}
        floor = matmul_floor(card)
        floor["max_speedup_vs_hf"] = round(floor["tokens_per_s"] / results["hf-generate"]["tokens_per_s"], 3)
        results["matmul-floor"] = floor
    for e in (args.hf_layerskip.split(",") if args.hf_layerskip else []):
        s, n, outs = hf_baseline(card.path, prompts, args.max_new_tokens, assistant_early_exit=int(e))
        results[f"hf-layerskip:{e}"] = {"tokens_per_s": round(n / s, 2), "tokens": n, "identical_to_ar": outs == reference}
    meta = {"model": card.name, "explorers": K, "width": args.width, "ar_widths": configured.ar_widths,
            "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
            "executor": args.executor, "compile": configured.compile, "adapters": configured.adapters}
    doc = {"config": meta, "modes": results}
    if configured.adapters:
        doc["without_adapters"] = {"modes": columns["none"]}
    doc["comparison"] = side_by_side({c: {m: r for m, r in modes_.items() if m in (*modes, "ead-oracle")}
                                      for c, modes_ in columns.items()})
    emit(doc, args.out, args.json, format_table)
    return 0


def single_process_ar(args: argparse.Namespace, prompts: list[str]) -> "DexEngine":
    """Plain autoregressive decoding in one process (K=1, the reference executor, every core's
    threads on CPU), warmed up: what DEX on one process per explorer is compared with."""
    from dexserve.engine.engine import DexEngine
    from dexserve.engine.measure import run_mode
    from dexserve.engine.memory import parallel_devices

    cfg = dataclasses.replace(engine_config(args, mode="ar"), explorers=1, executor="reference", max_batch=1,
                              adapters="none", threads=args.threads or parallel_devices("cpu"))
    engine = DexEngine.load(args.model, cfg)
    run_mode(engine, "ar", True, prompts[:1], 4)   # warm-up (compilation) outside the measurement
    return engine


def round_profile(profiler, rounds: int, top: int = 12) -> dict:
    """Milliseconds per round by function (own time), the top entries."""
    import pstats

    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    rows = sorted(((v[2], f"{k[2]} ({k[0].rsplit('/', 1)[-1]}:{k[1]})") for k, v in stats.items()), reverse=True)
    return {name: round(1e3 * t / rounds, 4) for t, name in rows[:top]}


def format_table(doc: dict) -> str:
    cols = ("rpt", "tokens_per_s", "fallback_rate", "wasted_node_segments", "identical_to_ar", "accept_hist")
    adapters = doc["config"].get("adapters")
    lines = [f"model {doc['config']['model']}  K={doc['config']['explorers']}  W={doc['config']['width']}  "
             f"prompts={doc['config']['prompts']}  max_new_tokens={doc['config']['max_new_tokens']}  "
             f"adapters={adapters['path'] if adapters else 'none'}",
             "| mode | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for mode, r in doc["modes"].items():
        if mode == "dex-profile":
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(" ".join(f"{k}:{n}" for k, n in v.items()) if isinstance(v, dict) else ("" if v is None else str(v)))
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    single, dex = doc["modes"].get("ar-1proc"), doc["modes"].get("dex")
    if single and dex and single.get("tokens_per_s") and dex.get("tokens_per_s"):
        lines.append(f"\ndex on {doc['config']['executor']} explorers: "
                     f"{dex['tokens_per_s'] / single['tokens_per_s']:.3f}x ar in one process (ar-1proc, the two in turns "
                     "prompt by prompt)")
    comparison = doc.get("comparison")
    if comparison:
        cols = ["none", "adapters"] if "without_adapters" in doc else ["none"]
        both = len(cols) == 2
        title = (f"without and with adapters {adapters['path']}" if both else "no adapters") + \
            " (agreement: each boundary's top-1 equal to the committed token, free-running in ar):"
        lines += ["", title,
                  "| | " + " | ".join(cols) + (" | change |" if both else " |"),
                  "|---|" + "---|" * (len(cols) + both)]
        for row, values in comparison.items():
            cells = ["" if values.get(c) is None else str(values[c]) for c in cols]
            if both:
                a, b = values.get("none"), values.get("adapters")
                numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
                cells.append(f"{100 * (b - a) / a:+.1f}%" if numeric and a else "")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    if "dex-profile" in doc["modes"]:
        lines.append("\nwhere a dex round's time goes (ms per round, own time):")
        lines.extend(f"  {ms:8.4f}  {name}" for name, ms in doc["modes"]["dex-profile"].items())
    return "\n".join(lines)
