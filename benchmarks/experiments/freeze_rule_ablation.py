"""The freezing-rule ablation table: training-domain validation (the selection) and test accuracy of each rule
beside LSQ+SAM and the absolute rule, seed 0.

    python benchmarks/experiments/freeze_rule_ablation.py
"""
import glob, json, sys
def rows(pattern, domains=None):
    """results.json of ``pattern`` by test domain; ``domains``: only these (a setting run on fewer domains is
    compared with its peers on the same ones)."""
    found = {r["test_domain"]: r for r in map(lambda f: json.load(open(f)), glob.glob(pattern))}
    return {t: r for t, r in found.items() if domains is None or t in domains}
D = "benchmarks/experiments/results/dg_freeze_rule_ablation"
PACS = "benchmarks/experiments/results/dg_pacs"  # the earlier sweep's seed-0 runs
W3 = (0, 1, 3)
settings = [
    ("PACS", "LSQ+SAM (dg_pacs)", f"{PACS}/PACS_lsq_sam_w4a4_t*_s0/results.json"),
    ("PACS", "GAQAT absolute 0.5 (dg_pacs)", f"{PACS}/PACS_gaqat_w4a4_t*_s0/results.json"),
    ("PACS", "GAQAT zscore 1.0 (freeze_mode=gradient)", f"{D}/pacs_w4_zscore1.0/*/results.json"),
    ("PACS", "GAQAT zscore 1.0, freeze_mode=update", f"{D}/pacs_w4_zscore1.0_update/*/results.json"),
    ("PACS", "GAQAT zscore 1.0, freeze_mode=task", f"{D}/pacs_w4_zscore1.0_task/*/results.json"),
    ("PACS", "GAQAT alltask (absolute 0, freeze_mode=task)", f"{D}/pacs_w4_absolute0.0_task/*/results.json"),
    ("PACS", "GAQAT ratio 0.05", f"{D}/pacs_w4_ratio0.05/*/results.json"),
    # W3A3, update mode: test domains 0, 1, 3 ran (photo, 2, was stopped at the call's deadline)
    ("PACS", "W3A3: LSQ+SAM (dg_pacs)", f"{PACS}/PACS_lsq_sam_w3a3_t*_s0/results.json", W3),
    ("PACS", "W3A3: GAQAT absolute 0.5 (dg_pacs)", f"{PACS}/PACS_gaqat_w3a3_t*_s0/results.json", W3),
    ("PACS", "W3A3: GAQAT zscore 1.0, freeze_mode=update", f"{D}/pacs_w3_zscore1.0_update/*/results.json", W3),
    ("PACS", "W3A3: GAQAT zscore 1.0, freeze_mode=task", f"{D}/pacs_w3_zscore1.0_task/*/results.json", W3),
    # the same W3A3 settings on every test domain (update mode lacks photo)
    ("PACS", "W3A3: LSQ+SAM (dg_pacs)", f"{PACS}/PACS_lsq_sam_w3a3_t*_s0/results.json"),
    ("PACS", "W3A3: GAQAT absolute 0.5 (dg_pacs)", f"{PACS}/PACS_gaqat_w3a3_t*_s0/results.json"),
    ("PACS", "W3A3: GAQAT zscore 1.0, freeze_mode=task", f"{D}/pacs_w3_zscore1.0_task/*/results.json"),
    ("RotatedMNIST", "LSQ+SAM (dg_h100_sweep)", "benchmarks/experiments/results/dg_h100_sweep/RotatedMNIST_lsq_sam_w4a4_t*_s0.json"),
    ("RotatedMNIST", "GAQAT absolute 0.5 (dg_h100_sweep)", "benchmarks/experiments/results/dg_h100_sweep/RotatedMNIST_gaqat_w4a4_t*_s0.json"),
    ("RotatedMNIST", "GAQAT zscore 1.0 (freeze_mode=gradient)", f"{D}/rmnist_w4_zscore1.0/*/results.json"),
    ("RotatedMNIST", "GAQAT ratio 0.05", f"{D}/rmnist_w4_ratio0.05/*/results.json"),
]
print("| dataset | setting (W4A4 unless named, seed 0) | test domains | val acc, mean | test acc per domain | test avg |")
print("|---|---|---|---|---|---|")
for ds, name, pat, *domains in settings:
    r = rows(pat, *domains); ts = sorted(r)
    val = sum(r[t]["val_acc"] for t in ts) / len(ts) * 100
    test = [r[t]["test_acc"] * 100 for t in ts]
    print(f"| {ds} | {name} | {' '.join(map(str, ts))} | {val:.2f} | {' / '.join(f'{x:.1f}' for x in test)} | {sum(test)/len(test):.2f} |")
