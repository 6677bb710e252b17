"""The six stages of a study, each a thin adapter from the config to a library call."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.config import StudyConfig
from interp.configparse import to_plain
from experiments.stages import Stage, StageResult
from interp.files import atomic_write_json
from interp.models import model_device

__all__ = ["build"]


def _sae_dirs(results: dict[str, StageResult]) -> list[Path]:
    return sorted(p.parent for p in (results["train"].directory / "saes").glob("*/cfg.json"))


def build(cfg: StudyConfig, model: Any, log: Callable[[dict], None], progress: bool) -> list[Stage]:
    """The study's stages in order; each closure reads only ``cfg``, ``model`` and upstream results."""
    import interp
    import saes

    h, s = cfg.harvest, cfg.sae
    model_id = cfg.model.name

    def load_sae(directory: Path) -> Any:
        """The trained SAE on the model's device (stages on a CUDA model would otherwise mix devices)."""
        return saes.load(directory, device=model_device(model))

    def harvest(directory: Path, results: dict) -> dict:
        store = interp.harvest(model, h.corpus, h.hooks, h.n_tokens, ctx=h.ctx, batch_size=h.batch_size,
                               out=directory / "store", seed=cfg.seed, progress=progress)
        return {"n_tokens": store.n_tokens, "hooks": ",".join(store.hooks)}

    def train(directory: Path, results: dict) -> dict:
        tcfg = saes.TrainConfig(
            hooks=list(h.hooks), settings=[(x.n_latents, x.k) for x in s.settings], n_tokens=s.n_tokens,
            batch_size=s.batch_size, lr=s.lr or None, seed=cfg.seed, batch_topk=s.batch_topk, auxk=s.auxk,
            enc_init_scale=s.enc_init_scale, cpu_bf16_encoder=s.cpu_bf16_encoder, checkpoint_every=s.checkpoint_every, progress=progress,
        )
        trained = saes.train(results["harvest"].directory / "store", tcfg, directory / "saes")
        rows = saes.read_metrics(directory / "saes" / "metrics.jsonl")
        for row in rows:
            log({"event": "train_step", **row})
        last = {}
        for row in rows:
            last[row["sae"]] = row
        summary: dict[str, Any] = {"n_saes": len(trained)}
        for name, row in last.items():
            for key in ("fvu", "l0", "dead_fraction"):
                if key in row:
                    summary[f"{name}.{key}"] = row[key]
        return summary

    def evaluate(directory: Path, results: dict) -> dict:
        summary = {}
        for sae_dir in _sae_dirs(results):
            sae = load_sae(sae_dir)
            out = directory / sae_dir.name / "eval.json"
            metrics = saes.evaluate(sae, model, h.corpus, n_tokens=cfg.eval.n_tokens, ctx=h.ctx,
                                    batch_size=h.batch_size, seed=cfg.seed, out=out, progress=progress)
            log({"event": "eval", "sae": sae_dir.name, **{k: v for k, v in metrics.items() if isinstance(v, int | float)}})
            for key in ("ce_loss_recovered", "fvu", "l0", "dead_fraction", "kl_clean_spliced"):
                if key in metrics:
                    summary[f"{sae_dir.name}.{key}"] = metrics[key]
        return summary

    def dashboard(directory: Path, results: dict) -> dict:
        pages = {}
        for sae_dir in _sae_dirs(results):
            sae = load_sae(sae_dir)
            scan = saes.scan_features(sae, model, h.corpus, n_tokens=cfg.dashboard.n_tokens, ctx=h.ctx,
                                      batch_size=h.batch_size, seed=cfg.seed, progress=progress)
            # Stats go beside the SAE too: loading it then fills max_activations ("10x" clamps).
            saes.save_feature_stats(scan, sae_dir)
            saes.save_feature_stats(scan, directory / sae_dir.name)
            board = saes.build_dashboard(sae, model, h.corpus, n_features=cfg.dashboard.n_features, ctx=h.ctx,
                                         batch_size=h.batch_size, seed=cfg.seed, scan=scan, progress=progress)
            pages[sae_dir.name] = str(board.save(directory / f"{sae_dir.name}.html").name)
            live = float((scan.frequency > 0).float().mean())
            log({"event": "feature_scan", "sae": sae_dir.name, "n_tokens": scan.n_tokens, "live_fraction": live})
        return {"pages": ",".join(pages.values())}

    def probe(directory: Path, results: dict) -> dict:
        import probes

        p = cfg.probes
        layers = None if p.layers == "all" else [int(x) for x in p.layers.split(",")]
        summary = {}
        for task in p.tasks:
            name = Path(task).stem
            report = probes.run_probe(model, task, probes.ProbeConfig(layers=layers, pooling=p.pooling, seed=cfg.seed),
                                      out=directory / name, progress=progress)
            best = report.metrics["best_layer"]
            summary[f"{name}.best_layer"] = best["layer"]
            for key in ("accuracy", "auroc", "selectivity"):
                summary[f"{name}.{key}"] = best[key]
            log({"event": "probe", "task": name, **{k: v for k, v in summary.items() if k.startswith(name)}})
        return summary

    def steer(directory: Path, results: dict) -> dict:
        from interp.steering_eval import concept_hit_rate, continuation_nll, load_steering_prompts

        st = cfg.steer
        sae_dir = _sae_dirs(results)[0]
        sae = load_sae(sae_dir)
        if sae.max_activations is None:
            scan = saes.scan_features(sae, model, h.corpus, n_tokens=cfg.dashboard.n_tokens, ctx=h.ctx, seed=cfg.seed, progress=progress)
            sae.max_activations = scan.max_activations
        keywords = st.keywords or st.query.split()
        found = saes.search_features(sae, model, query=st.query, baseline=h.corpus, ctx=h.ctx, seed=cfg.seed,
                                     top=st.n_candidates, progress=progress)
        if not found:
            return {"feature": -1, "note": f"no feature fired on {st.query!r}"}
        if st.rerank:
            # Choose by measured effect on the selection prompts, never on the reported ones.
            found = saes.select_steering_feature(sae, model, st.query, keywords, search=found, n_candidates=st.n_candidates,
                                                 strength=st.clamp, positions=st.positions, chat=False)
        feature = int(found[0]["feature"])
        prompts = load_steering_prompts()[: st.n_prompts]
        gens = interp.generate(model, prompts, interp.Clamp(sae, feature, st.clamp, positions=st.positions),
                               max_new_tokens=st.max_new_tokens, temperature=0.7, seed=cfg.seed, compare=True, progress=progress)
        steered_nll = continuation_nll(model, gens.prompt_tokens, gens.tokens)
        base_nll = continuation_nll(model, gens.prompt_tokens, gens.base_tokens)
        summary = {
            "feature": feature, "search_score": float(found[0]["score"]), "clamp": st.clamp, "positions": st.positions,
            "hit_rate_steered": concept_hit_rate(gens.texts, keywords),
            "hit_rate_base": concept_hit_rate(gens.base_texts, keywords),
            "nll_steered": float(steered_nll.nanmean()), "nll_base": float(base_nll.nanmean()),
        }
        samples = [{"prompt": p, "steered": a, "base": b} for p, a, b in zip(prompts, gens.texts, gens.base_texts)]
        atomic_write_json(directory / "steer.json", {**summary, "search": found, "samples": samples, "config": to_plain(st)})
        log({"event": "steer", **summary})
        return summary

    def inputs(*parts: Any) -> Callable[[], Any]:
        return lambda: json.loads(json.dumps([model_id, cfg.seed, *[to_plain(x) for x in parts]], default=str))

    def sae_inputs() -> Any:
        plain = inputs(s)()
        # enc_init_scale joined [sae] later, at 1.0 (the default then): runs made at 1.0 keep their stage keys.
        if plain[2].get("enc_init_scale") == 1.0:
            del plain[2]["enc_init_scale"]
        if not plain[2].get("cpu_bf16_encoder"):  # likewise for runs from before that option
            plain[2].pop("cpu_bf16_encoder", None)
        return plain

    return [
        Stage("harvest", inputs(h), harvest),
        Stage("train", sae_inputs, train, depends=("harvest",)),
        Stage("eval", inputs(cfg.eval), evaluate, depends=("train",)),
        Stage("dashboard", inputs(cfg.dashboard), dashboard, depends=("train",), enabled=cfg.dashboard.enabled),
        Stage("probes", inputs(cfg.probes), probe, enabled=cfg.probes.enabled),
        Stage("steer", inputs(cfg.steer, cfg.dashboard.n_tokens), steer, depends=("train",), enabled=cfg.steer.enabled),
    ]
