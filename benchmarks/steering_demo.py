"""The recorded steering demonstration: find a concept's feature, clamp it, count mentions.

    python benchmarks/steering_demo.py --sae DIR --concept bridge [--keywords bridge,bridges] \
        [--feature ID] [--clamp 10x] [--sweep 0,2,5,10x] [--max-new-tokens 40] [--out DIR]

On the 36 shipped neutral prompts (chat template on), with the same seeds for every setting:
the unsteered model, the clamped feature, and a random direction added with the same norm as
the clamp's push (value × ||W_dec[i]||) as the baseline. Without ``--feature`` the SAE feature
search (``saes.search_features``) picks the top feature for ``--concept``. Reports hit rates,
NLL of each continuation set under the unsteered model, distinct-2, and writes ``demo.json``
plus ``sweep.html`` (concept vs fluency) to ``--out``. Target: steered ≥ 60 %, unsteered ≤ 10 %.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import interp
from interp.files import atomic_write_json
from interp.steering_eval import (
    concept_hit_rate,
    continuation_nll,
    distinct_n,
    load_steering_prompts,
    random_direction_like,
    strength_sweep,
    write_sweep_html,
)


def pick_feature(sae, model, concept: str, baseline_tokens: int) -> tuple[int, list[dict]]:
    """The top feature of the SAE feature search for ``concept`` (and the search's rows)."""
    import saes

    rows = saes.search_features(sae, model, query=concept, n_baseline_tokens=baseline_tokens, top=5, progress=True)
    return int(rows[0]["feature"]), rows


def main() -> None:
    """Run the demonstration and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sae", required=True)
    parser.add_argument("--concept", required=True, help="the concept word to search for and count")
    parser.add_argument("--keywords", default=None, help="comma-separated words that count as a mention (default: the concept)")
    parser.add_argument("--feature", type=int, default=None)
    parser.add_argument("--clamp", default="10x")
    parser.add_argument("--sweep", default="0,2x,5x,10x")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-tokens", type=int, default=32_768, help="baseline corpus tokens for the feature search")
    parser.add_argument("--prompts", type=int, default=None, help="use only the first N shipped prompts (smoke runs)")
    parser.add_argument("--out", default="steering_demo")
    args = parser.parse_args()

    import saes

    model = interp.load_model(args.model)
    sae = saes.load(args.sae, device=model.cfg.device)
    feature, search = (args.feature, []) if args.feature is not None else pick_feature(sae, model, args.concept, args.baseline_tokens)
    keywords = [k.strip() for k in (args.keywords or args.concept).split(",") if k.strip()]
    prompts = load_steering_prompts()[: args.prompts]
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, chat=True, progress=True)

    clamp = interp.Clamp(sae, feature, args.clamp)
    push = float(clamp.values[0]) * float(sae.W_dec[feature].detach().norm())
    random_vec = random_direction_like(sae.W_dec[feature].detach().cpu(), seed=args.seed)
    settings = {
        "unsteered": [],
        f"clamp feature {feature} to {args.clamp}": [clamp],
        "random direction, same push": [interp.Add(sae.hook_name, random_vec, push)],
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
        print(f"{name:<40} hit rate {summary[name]['hit_rate']:6.1%}   NLL {summary[name]['nll']:.3f} nats/token   distinct-2 {summary[name]['distinct_2']:.2f}")

    strengths = [s.strip() for s in args.sweep.split(",") if s.strip()]
    unit_push = float(sae.W_dec[feature].detach().norm())
    max_act = float(sae.max_activations[feature]) if sae.max_activations is not None else 1.0
    curves = {
        f"clamp feature {feature}": strength_sweep(model, prompts, lambda s: [interp.Clamp(sae, feature, s)], strengths, keywords=keywords, **gen),
        "random direction": strength_sweep(
            model, prompts,
            lambda s: [interp.Add(sae.hook_name, random_vec, (float(s[:-1]) * max_act if str(s).endswith("x") else float(s)) * unit_push)],
            strengths, keywords=keywords, **gen,
        ),
    }
    out_dir = Path(args.out)
    write_sweep_html(curves, out_dir / "sweep.html", title=f"Steering toward '{args.concept}': concept vs fluency")
    atomic_write_json(out_dir / "demo.json", {
        "model": args.model, "sae": args.sae, "feature": feature, "search": search, "keywords": keywords,
        "clamp": args.clamp, "settings": gen, "n_prompts": len(prompts), "results": summary,
        "sweep": {k: [{kk: vv for kk, vv in r.items() if kk != "texts"} for r in rows] for k, rows in curves.items()},
        "torch": torch.__version__,
    })
    steered = summary[f"clamp feature {feature} to {args.clamp}"]["hit_rate"]
    base = summary["unsteered"]["hit_rate"]
    verdict = "MET" if steered >= 0.6 and base <= 0.1 else "NOT met"
    print(f"target (steered >= 60 %, unsteered <= 10 %): {verdict}; wrote {out_dir / 'demo.json'} and {out_dir / 'sweep.html'}")


if __name__ == "__main__":
    main()
