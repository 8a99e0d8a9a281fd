"""Measure whether a demo backbone supports the whole PCBM demo on a downstream world.

    python -m ml.demo.evaluate_backbone --ckpt ml/demo/checkpoint [--seed 1] [--correlation 0.9] [--json out.json]

Checks, with the targets the demo needs:
  (a) text-concept AUROC per concept on an unbiased audit set     mean >= 0.85
  (b) linear probe accuracy, in-distribution test and test_shifted  (reference)
  (c) sparse L1 logistic head over standardised text-concept scores; then zero the
      background concepts' weights: shifted gain >= +10 points, in-distribution cost
      <= 3 points; PCBM in-distribution accuracy >= 0.9 x the linear probe
  (d) linear CAVs (LinearSVC) from the concept example folders: held-out accuracy >= 0.90
  (e) pointing game of the "maskclip" dense tokens . text vector: >= 0.8 per group
Everything is generated in memory from the world config (the same images write_world
writes), so no files are needed.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from ml.demo.train_backbone import encode_with_dense, load_checkpoint, to_input
from ml.demo.world import (
    POOL_SPLIT,
    SHIFTED_SPLIT,
    WorldConfig,
    concept_example_indices,
    concept_vocabulary,
    default_config,
    generate_split,
)

HEAD_CS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
TARGETS = {"mean_auroc": 0.85, "prune_gain": 0.10, "prune_cost": 0.03, "pcbm_vs_probe": 0.90,
           "cav_heldout": 0.90, "pointing_object": 0.80, "pointing_background": 0.80}


@torch.no_grad()
def embed(model, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Raw image embeddings (N, d) and maskclip patch tokens (N, P, d)."""
    feats, toks = [], []
    for start in range(0, len(images), batch):
        f, t = encode_with_dense(model, to_input(torch.from_numpy(images[start:start + batch])))
        feats.append(f)
        toks.append(t)
    return torch.cat(feats).numpy(), torch.cat(toks).numpy()


@torch.no_grad()
def text_vectors(model, tokenizer, phrases: list[str]) -> np.ndarray:
    return F.normalize(model.encode_text(tokenizer(phrases)), dim=-1).numpy()


def _head(C: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=C, l1_ratio=1.0, solver="saga", max_iter=5000, tol=1e-4, random_state=seed)


def sparse_head(train_x, train_y, val_x, val_y, seed: int = 0, cs=HEAD_CS):
    """L1 head on standardised scores; the sparsest C whose val accuracy is within 1 point of the best."""
    scaler = StandardScaler().fit(train_x)
    fits = [(C, _head(C, seed).fit(scaler.transform(train_x), train_y)) for C in cs]
    accs = [m.score(scaler.transform(val_x), val_y) for _, m in fits]
    pick = next(i for i, a in enumerate(accs) if a >= max(accs) - 0.01)
    return scaler, fits[pick][1], fits[pick][0], dict(zip(cs, accs, strict=False))


def pointing(tokens: np.ndarray, masks: np.ndarray, presence: np.ndarray, text: np.ndarray, is_obj: np.ndarray,
             groups: list[str]) -> dict:
    """Share of (image, present concept) pairs whose upsampled map peaks on the right region."""
    n, p, _ = tokens.shape
    grid, size = int(round(p ** 0.5)), masks.shape[-1]
    maps = torch.from_numpy(np.einsum("npd,cd->ncp", tokens, text).reshape(n, -1, grid, grid))
    maps = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False).reshape(n, len(text), -1)
    peak = maps.argmax(-1).numpy()                                         # (N, C)
    flat = masks.reshape(n, -1)
    on_object = np.take_along_axis(flat, peak, axis=1)                     # (N, C)
    hit = np.where(is_obj[None, :], on_object, ~on_object)
    shifted = maps - maps.min(-1, keepdim=True).values
    obj_mass = (shifted * torch.from_numpy(flat[:, None, :]).float()).sum(-1) / shifted.sum(-1).clamp_min(1e-9)
    mass = np.where(is_obj[None, :], obj_mass.numpy(), 1 - obj_mass.numpy())
    area = np.where(is_obj[None, :], flat.mean(1)[:, None], 1 - flat.mean(1)[:, None])
    out = {}
    for name, sel in (("object", is_obj), ("background", ~is_obj)):
        out[name] = float(hit[:, sel][presence[:, sel]].mean())
        out[f"{name}_mass"] = float(mass[:, sel][presence[:, sel]].mean())
        out[f"{name}_area"] = float(area[:, sel][presence[:, sel]].mean())
    for g in dict.fromkeys(groups):
        sel = np.array([x == g for x in groups])
        out[f"group_{g}"] = float(hit[:, sel][presence[:, sel]].mean())
    return out


def cav_accuracy(pool_emb: np.ndarray, examples: dict, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of a LinearSVC per concept: half the examples train (C by 3-fold CV), half test."""
    out = {}
    for c, (name, (pos, neg)) in enumerate(examples.items()):
        rng = np.random.default_rng([seed, c])
        x = np.concatenate([pool_emb[pos], pool_emb[neg]])
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        order = rng.permutation(len(y))
        half = len(y) // 2
        tr, te = order[:half], order[half:]
        warnings.filterwarnings("ignore", category=ConvergenceWarning)  # C=10 on raw scores; accuracy is fine
        best = max((0.001, 0.01, 0.1, 1.0, 10.0), key=lambda C: cross_val_score(
            LinearSVC(C=C, max_iter=20000), x[tr], y[tr], cv=3).mean())
        out[name] = float(LinearSVC(C=best, max_iter=20000).fit(x[tr], y[tr]).score(x[te], y[te]))
    return out


def evaluate(ckpt: str | Path, world: WorldConfig | None = None, audit_n: int = 1000, seed: int = 0) -> dict:
    """Every metric of the module docstring for one checkpoint on one downstream world."""
    world = world or default_config()
    model, _, tokenizer = load_checkpoint(ckpt)
    concepts = concept_vocabulary(world)
    text = text_vectors(model, tokenizer, [c.phrases[0] for c in concepts])
    is_obj = np.array([c.kind == "object" for c in concepts])
    is_bg = ~is_obj
    splits = {name: generate_split(world, name) for name in world.counts}
    emb = {name: embed(model, s.images)[0] for name, s in splits.items()}
    labels = {name: s.labels for name, s in splits.items()}
    res: dict = {"world": world.to_dict()}

    audit_world = world.replace(pairing=None, counts={"audit": audit_n})
    audit = generate_split(audit_world, "audit")
    a_emb, a_tok = embed(model, audit.images)
    a_presence = audit.presence(world)
    scores = a_emb @ text.T
    res["auroc"] = {c.name: float(roc_auc_score(a_presence[:, i], scores[:, i])) for i, c in enumerate(concepts)}
    res["mean_auroc"] = float(np.mean(list(res["auroc"].values())))
    # The same on the biased in-distribution test split (what a user's attribute table would give).
    t_presence, t_scores = splits["test"].presence(world), emb["test"] @ text.T
    res["mean_auroc_test"] = float(np.mean([roc_auc_score(t_presence[:, i], t_scores[:, i])
                                            for i in range(len(concepts)) if 0 < t_presence[:, i].sum() < len(t_scores)]))

    probe_scaler = StandardScaler().fit(emb["train"])
    probe = max((LogisticRegression(C=C, max_iter=3000).fit(probe_scaler.transform(emb["train"]), labels["train"])
                 for C in (0.01, 0.1, 1.0)), key=lambda m: m.score(probe_scaler.transform(emb["val"]), labels["val"]))
    res["probe"] = {s: float(probe.score(probe_scaler.transform(emb[s]), labels[s])) for s in ("test", SHIFTED_SPLIT)}

    sc = {name: e @ text.T for name, e in emb.items()}
    scaler, head, C, val_curve = sparse_head(sc["train"], labels["train"], sc["val"], labels["val"], seed)
    acc = {s: float(head.score(scaler.transform(sc[s]), labels[s])) for s in ("test", SHIFTED_SPLIT)}
    pruned = copy.deepcopy(head)
    pruned.coef_[:, is_bg] = 0.0
    after = {s: float(pruned.score(scaler.transform(sc[s]), labels[s])) for s in ("test", SHIFTED_SPLIT)}
    res["pcbm"] = {"C": C, "val_by_C": val_curve, "nonzero": int((head.coef_ != 0).sum()),
                   "background_weight_share": float(np.abs(head.coef_[:, is_bg]).sum() / np.abs(head.coef_).sum()),
                   "before": acc, "after_prune": after,
                   "gain_shifted": after[SHIFTED_SPLIT] - acc[SHIFTED_SPLIT], "cost_test": acc["test"] - after["test"],
                   "vs_probe": acc["test"] / res["probe"]["test"]}

    pool = generate_split(world, POOL_SPLIT)
    res["cav"] = cav_accuracy(embed(model, pool.images)[0], concept_example_indices(world, pool), seed)
    res["mean_cav"] = float(np.mean(list(res["cav"].values())))
    res["pointing"] = pointing(a_tok, audit.masks, a_presence, text, is_obj, [c.group for c in concepts])
    res["checks"] = {
        "mean_auroc": res["mean_auroc"] >= TARGETS["mean_auroc"],
        "prune_gain": res["pcbm"]["gain_shifted"] >= TARGETS["prune_gain"],
        "prune_cost": res["pcbm"]["cost_test"] <= TARGETS["prune_cost"],
        "pcbm_vs_probe": res["pcbm"]["vs_probe"] >= TARGETS["pcbm_vs_probe"],
        "cav_heldout": res["mean_cav"] >= TARGETS["cav_heldout"],
        "pointing_object": res["pointing"]["object"] >= TARGETS["pointing_object"],
        "pointing_background": res["pointing"]["background"] >= TARGETS["pointing_background"],
    }
    return res


def summary(res: dict) -> str:
    p, pt = res["pcbm"], res["pointing"]
    worst = sorted(res["auroc"].items(), key=lambda kv: kv[1])[:3]
    return "\n".join([
        f"world seed={res['world']['seed']} corr={res['world']['correlation']} train={res['world']['counts']['train']}",
        f"(a) mean AUROC {res['mean_auroc']:.3f} (biased test split {res['mean_auroc_test']:.3f}); lowest " + ", ".join(f"{k} {v:.2f}" for k, v in worst),
        f"(b) probe test {res['probe']['test']:.3f} shifted {res['probe'][SHIFTED_SPLIT]:.3f}",
        f"(c) PCBM C={p['C']} nnz={p['nonzero']} bg-share={p['background_weight_share']:.2f} "
        f"test {p['before']['test']:.3f}->{p['after_prune']['test']:.3f} (cost {100 * p['cost_test']:+.1f}) "
        f"shifted {p['before'][SHIFTED_SPLIT]:.3f}->{p['after_prune'][SHIFTED_SPLIT]:.3f} "
        f"(gain {100 * p['gain_shifted']:+.1f}) vs probe {p['vs_probe']:.3f}",
        f"(d) CAV held-out mean {res['mean_cav']:.3f} min {min(res['cav'].values()):.3f}",
        f"(e) pointing object {pt['object']:.3f} background {pt['background']:.3f} | mass obj {pt['object_mass']:.2f}"
        f" (area {pt['object_area']:.2f}) bg {pt['background_mass']:.2f} (area {pt['background_area']:.2f}) | "
        + " ".join(f"{k[6:]} {v:.2f}" for k, v in pt.items() if k.startswith("group_")),
        "checks: " + " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in res["checks"].items()),
    ])


ALT_PAIRING = {"circle": "snow", "square": "sand", "triangle": "water", "star": "grass"}


def variants(base: WorldConfig) -> dict[str, WorldConfig]:
    """The robustness sweep reported in docs/demo-world.md: seeds, correlations, pairing, train size."""
    out = {"default": base}
    out.update({f"seed {s}": base.replace(seed=s) for s in (1, 2)})
    out.update({f"correlation {c}": base.replace(correlation=c) for c in (0.8, 0.9, 0.99)})
    out["other pairing"] = base.replace(pairing=ALT_PAIRING)
    out["other pairing, seed 1"] = base.replace(pairing=ALT_PAIRING, seed=1)
    out.update({f"train {n}": base.replace(counts={**base.counts, "train": n}) for n in (500, 2000)})
    return out


def sweep_table(ckpt: str | Path, base: WorldConfig) -> tuple[str, dict]:
    """One markdown row per variant."""
    rows = ["| world | AUROC | probe test / shifted | PCBM test / shifted | pruned test / shifted | gain | cost "
            "| PCBM/probe | CAV | pointing obj / bg |", "|" + "---|" * 10]
    results = {}
    for name, world in variants(base).items():
        r = results[name] = evaluate(ckpt, world)
        p, b, a = r["pcbm"], r["pcbm"]["before"], r["pcbm"]["after_prune"]
        rows.append(f"| {name} | {r['mean_auroc']:.3f} | {r['probe']['test']:.3f} / {r['probe'][SHIFTED_SPLIT]:.3f} "
                    f"| {b['test']:.3f} / {b[SHIFTED_SPLIT]:.3f} | {a['test']:.3f} / {a[SHIFTED_SPLIT]:.3f} "
                    f"| {100 * p['gain_shifted']:+.1f} | {100 * p['cost_test']:.1f} | {p['vs_probe']:.3f} "
                    f"| {r['mean_cav']:.3f} | {r['pointing']['object']:.3f} / {r['pointing']['background']:.3f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows), results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="evaluate a demo backbone on a downstream world")
    parser.add_argument("--ckpt", default=str(Path(__file__).with_name("checkpoint")))
    parser.add_argument("--world", default=None, help="world config JSON (default: default_world.json)")
    parser.add_argument("--seed", type=int, default=None, help="override the world seed")
    parser.add_argument("--correlation", type=float, default=None)
    parser.add_argument("--train", type=int, default=None, help="override the train count")
    parser.add_argument("--pairing", default=None, help="e.g. circle=snow,square=sand,triangle=water,star=grass")
    parser.add_argument("--json", default=None, help="write the full results here")
    parser.add_argument("--sweep", action="store_true", help="run the robustness sweep of docs/demo-world.md")
    args = parser.parse_args(argv)
    world = WorldConfig.load(args.world) if args.world else default_config()
    changes: dict = {}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.correlation is not None:
        changes["correlation"] = args.correlation
    if args.train is not None:
        changes["counts"] = {**world.counts, "train": args.train}
    if args.pairing:
        changes["pairing"] = dict(kv.split("=") for kv in args.pairing.split(","))
    world = world.replace(**changes) if changes else world
    if args.sweep:
        table, res = sweep_table(args.ckpt, world)
        print(table, flush=True)
    else:
        res = evaluate(args.ckpt, world)
        print(summary(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
