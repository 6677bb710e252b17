"""``interp steer``: generate with an SAE feature clamped (or a vector added) next to the unsteered model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from experiments.app import command, console
from experiments.steer_resume import previous_run, rescore, run_key, save_run
from interp.errors import UserError


def _strengths(sweep: str | None, single: str | None) -> list[str]:
    if sweep:
        values = [v.strip() for v in sweep.split(",") if v.strip()]
        if not values:
            raise UserError(f"--sweep {sweep!r} has no values; give a list like 0,2,5,10x")
        return values
    if single is None:
        raise UserError("say how strongly to steer: --clamp V, --scale F, --ablate, --coef C or --sweep 0,2,5,10x")
    return [single]


def _load_vector(path: Path, hook: str | None) -> Any:
    """A direction directory, or a .safetensors file holding one 1-D tensor (then --hook is needed)."""
    from interp.directions import Direction, load_direction

    if path.is_dir():
        return load_direction(path)
    if not path.is_file():
        raise UserError(f"no vector file at {path}; pass a direction directory or a .safetensors file")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); pass a direction directory or a .safetensors vector") from err
    vectors = [t for t in tensors.values() if t.ndim == 1]
    if "vector" in tensors:
        vectors = [tensors["vector"]]
    if len(vectors) != 1:
        raise UserError(f"{path} should hold exactly one 1-D tensor (ideally named 'vector'), found {len(vectors)}")
    if not hook:
        raise UserError("a bare vector file does not say where it applies; pass --hook blocks.N.hook_resid_post")
    return Direction(vector=vectors[0], hook_name=hook, model="unknown", source=f"file:{path}")


def _load_source(args: dict[str, Any]) -> Any:
    """The SAE (loaded on the CPU) or the direction to steer with; validated before the model loads."""
    if args["sae"] is not None:
        import saes

        if args["feature"] is None:
            raise UserError("--sae needs --feature ID (find one with the SAE feature search)")
        return saes.load(args["sae"], device="cpu", hook_name=args["hook"])
    source = args["vector"] or args["direction"]
    if source is None:
        raise UserError("give what to steer with: --sae DIR --feature ID, --vector FILE or --direction DIR")
    if args["mode"] in ("clamp", "scale"):
        raise UserError("--clamp and --scale need an SAE feature; with a vector use --coef C (or --ablate)")
    return _load_vector(Path(source), args["hook"])


def _make(source: Any, args: dict[str, Any], model: Any):
    """A function strength -> list of interventions, plus a description for the JSON."""
    import interp
    from interp.directions import Direction
    from interp.models import model_device

    positions, mode = args["positions"], args["mode"]
    if not isinstance(source, Direction):
        sae = source.to(model_device(model))
        try:
            feats = [int(f) for f in str(args["feature"]).split(",")]
        except ValueError:
            raise UserError(f"--feature {args['feature']!r} is not a feature id; give integers like 123 or 12,40") from None
        desc = {"sae": str(args["sae"]), "features": feats, "hook": sae.hook_name, "mode": mode}
        if mode == "clamp":
            return (lambda s: [interp.Clamp(sae, feats, s, positions=positions)]), desc
        if mode == "scale":
            return (lambda s: [interp.Scale(sae, feats, s, positions=positions)]), desc
        if mode == "ablate":
            return (lambda s: [interp.Ablate(sae=sae, features=feats, positions=positions)]), desc
        return (lambda s: [interp.Add.feature(sae, f, s, positions=positions) for f in feats]), desc
    hook = args["hook"] or source.hook_name
    desc = {"vector": str(args["vector"] or args["direction"]), "hook": hook, "mode": mode}
    if mode == "ablate":
        return (lambda s: [interp.Ablate(hook, source, positions=positions)]), desc
    return (lambda s: [interp.Add(hook, source, s, positions=positions)]), desc


def _random_like(interventions: list[Any], seed: int) -> list[Any]:
    """Each clamp or add replaced by adding a random direction with the same push (the steering baseline).

    A clamp's push is ``||sum_i v_i W_dec[i]||`` (the decoder contribution it pins); an add keeps its
    coefficient on a random unit vector.
    """
    import torch

    import interp
    from interp.steering_eval import random_direction_like

    out = []
    for i, iv in enumerate(interventions):
        if isinstance(iv, interp.Clamp):
            target = iv.values.to(iv.sae.W_dec.dtype) @ iv.sae.W_dec.detach()[iv.features.to(iv.sae.W_dec.device)].cpu()
            direction = random_direction_like(torch.ones_like(target), seed + i)  # any norm: Add uses its unit vector
            out.append(interp.Add(iv.hook, direction, float(target.norm()), positions=iv.positions))
        elif isinstance(iv, interp.Add):
            out.append(interp.Add(iv.hook, random_direction_like(iv.unit, seed + i), iv.coef_spec, positions=iv.positions))
        else:
            raise UserError("--random-baseline needs --clamp or --coef (a scale or ablation has no push to match)")
    return out


@command("steer")
def steer(
    model_name: str = typer.Option("smollm2-135m", "--model", help="Model name or local HF directory."),
    sae: Path = typer.Option(None, "--sae", help="SAE directory (ours, SAELens or sparsify)."),
    feature: str = typer.Option(None, "--feature", help="Feature id(s) of the SAE, comma-separated."),
    clamp: str = typer.Option(None, "--clamp", help="Clamp the feature(s) to this value; '10x' = 10 x the feature's max activation."),
    scale: str = typer.Option(None, "--scale", help="Multiply the feature(s) by this factor."),
    ablate: bool = typer.Option(False, "--ablate", help="Ablate the feature(s) or the vector's direction."),
    vector: Path = typer.Option(None, "--vector", help="A .safetensors file with one vector (needs --hook) or a direction directory."),
    direction: Path = typer.Option(None, "--direction", help="A direction directory (written by probes or CAA)."),
    coef: str = typer.Option(None, "--coef", help="Add the unit vector times C (residual units); '4x' = 4 x mean residual norm at the hook."),
    hook: str = typer.Option(None, "--hook", help="Hook to steer at (default: the SAE's or the direction's)."),
    prompt: list[str] = typer.Option(None, "--prompt", help="Prompt (repeatable). Default: the 36 shipped neutral prompts."),
    prompt_set: str = typer.Option(None, "--prompt-set", help="Instead of --prompt: 'shipped' (36 neutral prompts), 'fresh' (36 held-out ones) or 'both'."),
    n: int = typer.Option(1, "--n", help="Samples per prompt (each from its own seed)."),
    sweep: str = typer.Option(None, "--sweep", help="Comma-separated strengths to sweep, e.g. 0,2,5,10x (replaces --clamp/--scale/--coef)."),
    positions: str = typer.Option("all", "--positions", help="all, prompt, generated or after:<marker>."),
    keywords: str = typer.Option(None, "--keywords", help="Comma-separated concept words: report the hit rate of steered vs base."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap prompts in the model's chat template (default on; a no-op for models without one)."),
    max_new_tokens: int = typer.Option(40, "--max-new-tokens", help="Tokens to generate per sample."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass."),
    seed: int = typer.Option(0, "--seed", help="Base seed; sample i uses seed + i for both steered and base."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per generation batch."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a local/hub model to run its own Python code (off by default; only for models you trust)."),
    random_baseline: bool = typer.Option(False, "--random-baseline", help="Also steer along a random direction with the same push at every strength (with --clamp or --coef; doubles the generation)."),
    out: Path = typer.Option(None, "--out", help="Write prompts, settings, continuations and metrics here as JSON (with --keywords also the concept-vs-fluency curve as .html); a rerun resumes."),
) -> None:
    """Steer generation and print steered vs unsteered continuations side by side.

    Prompts get the model's chat template unless --no-chat (SmolLM2-Instruct has one). The unsteered
    run uses the same seeds, so differences come from the intervention only.
    """
    import interp
    from interp.steering_eval import continuation_nll, load_steering_prompts

    if out is not None and Path(out).suffix.lower() == ".html":
        raise UserError(f"--out {out} is the JSON file (the curve goes beside it as .html); give a path like run.json")
    if prompt and prompt_set:
        raise UserError("--prompt and --prompt-set both choose the prompts; give one of them")
    modes = [m for m, on in (("clamp", clamp is not None), ("scale", scale is not None), ("ablate", ablate), ("add", coef is not None)) if on]
    if len(modes) > 1:
        raise UserError(f"choose one of --clamp, --scale, --ablate, --coef (got {', '.join('--' + m for m in modes)})")
    mode = modes[0] if modes else ("add" if sae is None else "clamp")
    strengths = ["0"] if mode == "ablate" else _strengths(sweep, clamp or scale or coef)
    if n < 1:
        raise UserError("--n must be at least 1")
    prompts = list(prompt) if prompt else load_steering_prompts(prompt_set or "shipped")
    samples = [p for p in prompts for _ in range(n)]
    words = [w.strip() for w in keywords.split(",") if w.strip()] if keywords else None
    from interp.steering_positions import as_positions

    args = dict(sae=sae, feature=feature, hook=hook, vector=vector, direction=direction, mode=mode, positions=as_positions(positions))
    source = _load_source(args)
    model = interp.load_model(model_name, device=device, trust_remote_code=trust_remote_code)
    make, desc = _make(source, args, model)
    gen_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, chat=chat, progress=True)
    # Build every intervention up front, so a bad strength fails before any generation.
    plans = [(strength, make(strength)) for strength in strengths]
    baselines = {strength: _random_like(ivs, seed) for strength, ivs in plans} if random_baseline else {}
    from interp.models import model_device
    from interp.models import model_name as name_of

    settings = {k: v for k, v in gen_kw.items() if k != "progress"}
    header = {"model": name_of(model), "intervention": desc, "positions": positions, "settings": settings, "keywords": words, "random_baseline": random_baseline}
    # Keywords only score texts (reused results are re-scored), so they stay out of the run key;
    # the device and dtype decide the sampled tokens, so they go in.
    weights = next(model.parameters())
    key = run_key({**header, "keywords": None, "device": str(model_device(model)), "dtype": str(weights.dtype)}, samples, source)
    base, done = previous_run(out, key, strengths)
    if done:
        console.print(f"resuming {out}: {len(done)} of {len(strengths)} strengths already done")
    if base is None:
        run = interp.generate(model, samples, [], **gen_kw)
        base = {"texts": run.texts, "nll": float(continuation_nll(model, run.prompt_tokens, run.tokens).nanmean())}
        if out is not None:
            save_run(out, header, key, base, [], complete=False)
    results = []
    for strength, interventions in plans:
        # Hit rates always come from the texts (rescore), for new and reused strengths alike:
        # the keywords may have changed since a reused strength was generated.
        if strength in done:
            results.append(rescore(done[strength], words))
            continue
        run = interp.generate(model, samples, interventions, **gen_kw)
        row = {
            "strength": strength,
            "nll": float(continuation_nll(model, run.prompt_tokens, run.tokens).nanmean()),
            "base_nll": base["nll"],
            "samples": [{"prompt": p, "base": b, "steered": s} for p, b, s in zip(samples, base["texts"], run.texts)],
        }
        if random_baseline:
            rnd = interp.generate(model, samples, baselines[strength], **gen_kw)
            row["random_nll"] = float(continuation_nll(model, rnd.prompt_tokens, rnd.tokens).nanmean())
            for sample, text in zip(row["samples"], rnd.texts):
                sample["random"] = text
        results.append(rescore(row, words))
        if out is not None:  # after every strength, so an interrupted sweep resumes here
            save_run(out, header, key, base, results, complete=False)
    table = Table(title=f"steering ({desc.get('mode')}) — chat template {'on' if chat else 'off'}", show_lines=True)
    for col in ("prompt", "strength", "base", "steered"):
        table.add_column(col, overflow="fold")
    for res in results:
        for sample in res["samples"][: max(1, min(len(samples), 8))]:
            table.add_row(sample["prompt"], str(res["strength"]), sample["base"], sample["steered"])
    console.print(table)
    for res in results:
        hits = f", hit rate {res['hit_rate']:.0%} vs base {res['base_hit_rate']:.0%}" if words else ""
        if "random_nll" in res:
            hits += f"; random direction: NLL {res['random_nll']:.3f}" + (f", hit rate {res['random_hit_rate']:.0%}" if words else "")
        console.print(f"strength {res['strength']}: NLL {res['nll']:.3f} vs base {res['base_nll']:.3f} nats/token{hits}")
    if out is not None:
        save_run(out, header, key, base, results, complete=True)
        console.print(f"wrote {out}")
        if words:  # the concept-vs-fluency curve: hit rate against NLL, one point per strength
            from interp.steering_eval import write_sweep_html

            label = f"{desc['mode']} " + (f"feature {','.join(map(str, desc['features']))}" if "features" in desc else "vector")
            curves = {label: [{k: r[k] for k in ("strength", "hit_rate", "nll")} for r in results],
                      **({"random direction, same push": [{"strength": r["strength"], "hit_rate": r["random_hit_rate"], "nll": r["random_nll"]} for r in results]}
                         if random_baseline else {}),
                      "unsteered": [{"strength": "base", "hit_rate": results[0]["base_hit_rate"], "nll": base["nll"]}]}
            console.print(f"wrote {write_sweep_html(curves, Path(out).with_suffix('.html'), title=f'Steering toward {words[0]!r}: concept vs fluency')}")
