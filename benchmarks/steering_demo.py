"""The recorded steering demonstration: find a concept's feature, clamp it, count mentions.

    python benchmarks/steering_demo.py --sae DIR --concept God [--keywords God,Lord] \
        [--feature ID] [--max-cost 1.5] [--clamp auto|5x] [--select-sweep 2x,3x,5x] [--positions generated] \
        [--select-top 5 --max-nll 5.0 [--select-only]] [--search-from RUN/demo.json] \
        [--sweep 0,2x,5x] [--max-new-tokens 32] [--prompt-set shipped|fresh|both] [--out DIR]

Choices are made on the 48 SELECTION prompts (``interp/data/steering_selection_prompts.txt``),
results are reported on the 36 shipped neutral prompts, the 36 fresh ones
(``steering_prompts_fresh.txt``) or both (chat template on), never the other way round. Without
``--feature``, ``saes.select_steering_feature`` takes the feature search's top ``--candidates``
for ``--concept`` and keeps the one whose clamp most raises the keywords'
probability (teacher-forced, at ``--select-strength``) among those whose NLL cost at that strength is at
most ``--max-cost`` nats (an uncapped rerank picks capitalisation or register features that raise
"God" by breaking the text). With ``--clamp auto`` the strength is the
one of ``--select-sweep`` with the highest hit rate on the selection prompts (ties: lower NLL).
With ``--select-top N`` the rerank's top N (after ``--max-cost``) are each generated at every
``--select-sweep`` strength on the selection prompts, and the (feature, strength) pair with the
highest hit rate among those whose NLL is at most ``--max-nll`` wins (ties: lower NLL;
``saes.steer_select.choose_steering_pair``); every pair's row goes to ``selection.json`` first.
Reported, with the same seeds for every setting: the unsteered model, the clamped feature, and a
random direction added with the same norm as the clamp's push (value × ||W_dec[i]||) as the
baseline — hit rates, NLL of each continuation set under the unsteered model, distinct-2.
Writes ``demo.json`` and ``sweep.html`` (concept vs fluency on the selection prompts, plus the
``--sweep`` on the reported prompts if given) to ``--out``. Target: steered ≥ 60 %, unsteered ≤ 10 %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import interp
from interp.errors import UserError
from interp.files import atomic_write_json, sha256_file
from interp.models import model_device
from interp.steering_eval import (
    concept_hit_rate,
    continuation_nll,
    distinct_n,
    load_steering_prompts,
    random_direction_like,
    strength_sweep,
    write_sweep_html,
)


def pick_strength(model, sae, feature: int, strengths: list[str], keywords: list[str], positions: str, gen: dict) -> tuple[str, list[dict]]:
    """The strength with the best hit rate on the selection prompts (ties: lower NLL), and the sweep rows."""
    from saes.steer_select import load_selection_prompts

    rows = strength_sweep(model, load_selection_prompts(), lambda s: [interp.Clamp(sae, feature, s, positions=positions)], strengths, keywords=keywords, **gen)
    for r in rows:
        print(f"selection: clamp {r['strength']:>5}  hit rate {r['hit_rate']:6.1%}   NLL {r['nll']:.3f}   distinct-2 {r['distinct_2']:.2f}")
    best = min(rows, key=lambda r: (-r["hit_rate"], r["nll"]))
    return str(best["strength"]), rows


def pick_pair(model, sae, candidates: list[dict], strengths: list[str], keywords: list[str], positions: str, max_nll: float,
              gen: dict, out_dir: Path) -> tuple[int, str, list[dict]]:
    """Sweep every candidate feature over ``strengths`` on the selection prompts; the best affordable pair and all rows.

    The rows (without texts in the printout) are written to ``out_dir/selection.json`` before anything else runs.
    """
    from saes.steer_select import choose_steering_pair, load_selection_prompts

    prompts, rows = load_selection_prompts(), []
    for cand in candidates:
        feature = int(cand["feature"])
        sweep = strength_sweep(model, prompts, lambda s: [interp.Clamp(sae, feature, s, positions=positions)], strengths, keywords=keywords, **gen)
        for r in sweep:
            r.update(feature=feature, strength=str(r["strength"]), effect=cand["effect"], effect_cost=cand["nll_increase"])
            print(f"selection: feature {feature:5d} clamp {r['strength']:>5}  hit rate {r['hit_rate']:6.1%}   NLL {r['nll']:.3f}"
                  f"   distinct-2 {r['distinct_2']:.2f}")
        rows += sweep
    try:
        best = choose_steering_pair(rows, max_nll)
    except UserError as err:
        sys.exit(str(err))
    print(f"selection: chosen feature {best['feature']} at {best['strength']} (hit rate {best['hit_rate']:.1%}, NLL {best['nll']:.3f};"
          f" budget {max_nll} nats/token, {len(prompts)} prompts)")
    atomic_write_json(out_dir / "selection.json", {
        "n_prompts": len(prompts), "max_nll": max_nll, "chosen": {"feature": best["feature"], "strength": best["strength"]},
        "rows": rows, "settings": gen, "command": "python " + " ".join(sys.argv)})
    return int(best["feature"]), str(best["strength"]), rows


def load_search(path: str, sae_dir: str, keywords: list[str], model: str, positions: str) -> list[dict]:
    """The reranked candidates saved in an earlier run's ``demo.json``, after checking it searched the same SAE
    (path, and weights digest where the run recorded one), model, positions and keywords."""
    import json

    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        sys.exit(f"--search-from {path}: cannot read it ({err}); point it at an earlier run's demo.json")
    if not isinstance(saved, dict) or not saved.get("search"):
        sys.exit(f"--search-from {path}: it holds no reranked candidates (a run with --feature searches nothing); drop --search-from")
    if Path(str(saved.get("sae"))).resolve() != Path(sae_dir).resolve() or saved.get("keywords") != keywords or saved.get("model") != model \
            or saved.get("positions") != positions:
        sys.exit(f"--search-from {path}: that run searched {saved.get('sae')!r} ({saved.get('model')}, {saved.get('positions')} positions) for"
                 f" {saved.get('keywords')}, not {sae_dir!r} ({model}, {positions}) for {keywords}; drop --search-from to search again")
    digest = sha256_file(Path(sae_dir) / "sae_weights.safetensors")
    if saved.get("sae_sha256", digest) != digest:
        sys.exit(f"--search-from {path}: the SAE at {sae_dir} has been retrained since that search; drop --search-from to search again")
    return saved["search"]


def main() -> None:
    """Run the demonstration and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sae", required=True)
    parser.add_argument("--concept", required=True, help="the concept word to search for and count")
    parser.add_argument("--keywords", default=None, help="comma-separated words that count as a mention (default: the concept)")
    parser.add_argument("--feature", type=int, default=None)
    parser.add_argument("--clamp", default="auto", help="a value, 'Nx', or 'auto' (best of --select-sweep on the selection prompts)")
    parser.add_argument("--select-sweep", default="2x,3x,5x", help="strengths tried on the selection prompts for --clamp auto")
    parser.add_argument("--select-strength", default="5x", help="clamp strength of the teacher-forced effect that ranks candidates")
    parser.add_argument("--candidates", type=int, default=20, help="feature-search candidates reranked by measured effect")
    parser.add_argument("--max-cost", type=float, default=1.5, help="skip candidates whose teacher-forced NLL cost exceeds this (nats; 'inf' keeps all)")
    parser.add_argument("--select-top", type=int, default=0,
                        help="sweep the rerank's top N features at every --select-sweep strength and pick the pair by --max-nll (0: off)")
    parser.add_argument("--max-nll", type=float, default=5.0, help="selection NLL budget (nats/token under the unsteered model) for --select-top")
    parser.add_argument("--positions", default="generated", choices=["generated", "all"], help="where the clamp acts")
    parser.add_argument("--sweep", default="", help="strengths swept on the reported prompts too (slow; e.g. 0,2x,5x)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-tokens", type=int, default=32_768, help="baseline corpus tokens for the feature search")
    parser.add_argument("--stats-tokens", type=int, default=32_768,
                        help="corpus tokens scanned for max activations when the SAE has no feature stats yet")
    parser.add_argument("--prompts", type=int, default=None, help="use only the first N prompts of each reported set (smoke runs)")
    parser.add_argument("--prompt-set", default="shipped", choices=["shipped", "fresh", "both"],
                        help="reported prompts: the 36 shipped ones, the 36 fresh (held-out replication) ones, or both (hit rates per set too)")
    parser.add_argument("--search-from", default=None,
                        help="reuse the reranked candidates in an earlier run's demo.json (same SAE and keywords) instead of searching again")
    parser.add_argument("--select-only", action="store_true", help="with --select-top: stop once selection.json is written")
    parser.add_argument("--out", default="steering_demo")
    args = parser.parse_args()
    if args.select_top > 0 and args.feature is not None:
        sys.exit("--select-top chooses the feature itself; drop --feature")
    if args.select_only and args.select_top <= 0:
        sys.exit("--select-only stops after the --select-top selection; add --select-top N or drop --select-only")
    if args.search_from and args.feature is not None:
        sys.exit("--search-from reuses a feature search, but --feature skips the search; drop one of them")
    if args.prompts is not None and args.prompts < 1:
        sys.exit(f"--prompts must be at least 1 (got {args.prompts}); leave it out to use every prompt")

    import saes

    model = interp.load_model(args.model)
    sae = saes.load(args.sae, device=model_device(model))
    if sae.max_activations is None:  # "5x" strengths need them: scan once and keep them beside the SAE
        scan = saes.scan_features(sae, model, "default", n_tokens=args.stats_tokens, progress=True)
        saes.save_feature_stats(scan, args.sae)
        sae.max_activations = scan.max_activations.to(sae.W_dec.device)
    keywords = [k.strip() for k in (args.keywords or args.concept).split(",") if k.strip()]
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, chat=True, progress=True)
    search = []
    feature = args.feature
    if feature is None:
        if args.search_from:
            search = load_search(args.search_from, args.sae, keywords, args.model, args.positions)
        else:
            search = saes.select_steering_feature(sae, model, args.concept, keywords, n_candidates=args.candidates, strength=args.select_strength,
                                                  positions=args.positions, n_baseline_tokens=args.baseline_tokens, progress=True)
        for r in search[:5]:
            print(f"candidate {r['feature']:5d}  search rank {r['search_rank']:2d}  effect {r['effect']:+.2f} nats  NLL cost {r['nll_increase']:+.2f}")
        affordable = [r for r in search if r["nll_increase"] <= args.max_cost]
        if not affordable:
            sys.exit(f"no candidate's NLL cost is <= --max-cost {args.max_cost} nats; raise --max-cost or lower --select-strength")
        feature = int(affordable[0]["feature"])
    clamp_value, selection_sweep = args.clamp, []
    select_strengths = [s.strip() for s in args.select_sweep.split(",") if s.strip()]
    if args.select_top > 0:
        feature, clamp_value, selection_sweep = pick_pair(model, sae, affordable[: args.select_top], select_strengths, keywords, args.positions,
                                                          args.max_nll, gen, Path(args.out))
        if args.select_only:
            print(f"--select-only: stopping; selection in {Path(args.out) / 'selection.json'}")
            return
    elif args.clamp == "auto":
        clamp_value, selection_sweep = pick_strength(model, sae, feature, select_strengths, keywords, args.positions, gen)
    names = ["shipped", "fresh"] if args.prompt_set == "both" else [args.prompt_set]
    prompt_sets = {name: load_steering_prompts(name)[: args.prompts] for name in names}
    prompts = [p for ps in prompt_sets.values() for p in ps]

    clamp = interp.Clamp(sae, feature, clamp_value, positions=args.positions)
    push = float(clamp.values[0]) * float(sae.W_dec[feature].detach().norm())
    random_vec = random_direction_like(sae.W_dec[feature].detach().cpu(), seed=args.seed)
    settings = {
        "unsteered": [],
        f"clamp feature {feature} to {clamp_value}": [clamp],
        "random direction, same push": [interp.Add(sae.hook_name, random_vec, push, positions=args.positions)],
    }
    summary = {}
    for name, ivs in settings.items():
        out = interp.generate(model, prompts, ivs, **gen)
        nll = continuation_nll(model, out.prompt_tokens, out.tokens)
        summary[name] = {
            "hit_rate": concept_hit_rate(out.texts, keywords),
            "nll": float(nll.nanmean()),
            "distinct_2": distinct_n(out.texts, 2),
            "samples": [{"prompt": p, "text": t} for p, t in zip(prompts, out.texts)],
        }
        if len(prompt_sets) > 1:
            start, summary[name]["hit_rate_by_set"] = 0, {}
            for set_name, ps in prompt_sets.items():
                summary[name]["hit_rate_by_set"][set_name] = concept_hit_rate(out.texts[start: start + len(ps)], keywords)
                start += len(ps)
        by_set = "".join(f"  [{k}: {v:.1%}]" for k, v in summary[name].get("hit_rate_by_set", {}).items())
        print(f"{name:<40} hit rate {summary[name]['hit_rate']:6.1%}   NLL {summary[name]['nll']:.3f} nats/token   distinct-2 {summary[name]['distinct_2']:.2f}{by_set}")

    strengths = [s.strip() for s in args.sweep.split(",") if s.strip()]
    curves = {}
    for f in dict.fromkeys(r.get("feature", feature) for r in selection_sweep):
        curves[f"clamp feature {f}, selection prompts"] = [r for r in selection_sweep if r.get("feature", feature) == f]
    if strengths:
        curves[f"clamp feature {feature}, reported prompts"] = strength_sweep(
            model, prompts, lambda s: [interp.Clamp(sae, feature, s, positions=args.positions)], strengths, keywords=keywords, **gen)
    curves["reported settings"] = [{"strength": name, "hit_rate": r["hit_rate"], "nll": r["nll"]} for name, r in summary.items()]
    out_dir = Path(args.out)
    write_sweep_html(curves, out_dir / "sweep.html", title=f"Steering toward '{args.concept}': concept vs fluency")
    atomic_write_json(out_dir / "demo.json", {
        "model": args.model, "sae": args.sae, "feature": feature, "max_cost": args.max_cost, "select_top": args.select_top, "max_nll": args.max_nll, "search": search, "keywords": keywords,
        "clamp": clamp_value, "positions": args.positions, "selection_prompts": "interp/data/steering_selection_prompts.txt", "settings": gen, "n_prompts": len(prompts), "prompt_set": args.prompt_set,
        "sae_sha256": sha256_file(Path(args.sae) / "sae_weights.safetensors"), "search_from": args.search_from, "results": summary,
        "sweep": {k: [{kk: vv for kk, vv in r.items() if kk != "texts"} for r in rows] for k, rows in curves.items()},
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
    })
    steered = summary[f"clamp feature {feature} to {clamp_value}"]["hit_rate"]
    base = summary["unsteered"]["hit_rate"]
    verdict = "MET" if steered >= 0.6 and base <= 0.1 else "NOT met"
    print(f"target (steered >= 60 %, unsteered <= 10 %): {verdict}; wrote {out_dir / 'demo.json'} and {out_dir / 'sweep.html'}")


if __name__ == "__main__":
    main()
