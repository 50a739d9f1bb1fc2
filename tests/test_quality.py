"""Exit adapters (fit, store, apply only to exited tokens) and the quality report's files."""

from __future__ import annotations

import json

import pytest
import torch

from sedac_ray import Engine, ExitPolicy
from sedac_ray.calibration.adapter_fit import fit_exit_adapters
from sedac_ray.calibration.probe_fit import PROBE, V7_PROBE
from sedac_ray.calibration.prompts import PROMPT_SETS, load_prompts
from sedac_ray.calibration.report import QualityBench
from sedac_ray.calibration.sweep import CALM, NO_EXIT, ORACLE, STABLE_ORACLE, V6, V7, WINDOW, SweepGrid
from sedac_ray.calibration.traces import record_traces
from sedac_ray.exit_adapters import ExitAdapters
from tests.conftest import CHAT_PROMPTS

NEVER_EXITS = ExitPolicy(1.0, k=1)  # stability is never > 1
EXIT_AT_20 = ExitPolicy(1e-6, k=1, min_layer=20)  # every decode token exits after layer 20


def random_adapters(num_layers: int = 30, width: int = 576, rank: int = 8) -> ExitAdapters:
    generator = torch.Generator().manual_seed(0)
    maps = {
        layer: (
            torch.randn(width, rank, generator=generator) * 0.05,
            torch.randn(rank, width, generator=generator) * 0.05,
            torch.randn(width, generator=generator) * 0.05,
        )
        for layer in range(1, num_layers)
    }
    return ExitAdapters(maps, num_layers)


def test_packaged_prompt_sets_are_disjoint_and_large_enough():
    calibration, heldout = (load_prompts(name) for name in PROMPT_SETS)
    assert len(calibration) >= 60 and len(heldout) >= 30
    assert {p.chat for p in calibration} == {True, False}
    texts = [{json.dumps(p.prompt) for p in prompts} for prompts in (calibration, heldout)]
    assert len(texts[0]) == len(calibration) and not texts[0] & texts[1]


def test_adapters_save_load_and_map_only_exited_rows(tmp_path):
    adapters = random_adapters()
    path = adapters.save(tmp_path / "a.adapters.safetensors", metadata={"model": "x"})
    loaded = ExitAdapters.load(path)
    assert loaded.layers == list(range(1, 30)) and loaded.num_layers == 30
    for layer in (1, 17, 29):  # stored as float16
        for stored, original in zip(loaded.maps[layer], adapters.maps[layer], strict=True):
            torch.testing.assert_close(stored, original, atol=1e-3, rtol=1e-3)
    hidden = torch.randn(4, 576)
    out = loaded.apply(hidden, torch.tensor([30, 12, 30, 29]))
    assert torch.equal(out[[0, 2]], hidden[[0, 2]])
    assert not torch.allclose(out[[1, 3]], hidden[[1, 3]])
    with pytest.raises(ValueError, match="outside 1..29"):
        ExitAdapters({30: adapters.maps[1]}, 30)


def test_engine_applies_adapters_only_to_tokens_that_exit(smollm2):
    adapters = random_adapters()
    plain = Engine(smollm2, EXIT_AT_20)
    adapted = Engine(smollm2, EXIT_AT_20, adapters=adapters)
    hidden = torch.randn(3, 576)
    layers = torch.tensor([30, 20, 25])
    with torch.inference_mode():
        base, mapped = plain.exit_logits(hidden, layers), adapted.exit_logits(hidden, layers)
    torch.testing.assert_close(mapped[0], base[0], rtol=0, atol=0)  # a full-depth token is untouched
    assert not torch.allclose(mapped[1:], base[1:])  # exited tokens' logits change

    kwargs = dict(max_new_tokens=5, chat=True)
    full = plain.generate(CHAT_PROMPTS[:2], policy=NEVER_EXITS, **kwargs)
    assert [r.token_ids for r in adapted.generate(CHAT_PROMPTS[:2], policy=NEVER_EXITS, **kwargs)] == [
        r.token_ids for r in full
    ]
    exited_plain = plain.generate(CHAT_PROMPTS[:2], **kwargs)
    exited_adapted = adapted.generate(CHAT_PROMPTS[:2], **kwargs)
    assert all(layer == 20 for r in exited_adapted for layer in r.exit_layers[1:])
    assert [r.token_ids[0] for r in exited_adapted] == [r.token_ids[0] for r in full]  # prefill: full depth
    assert [r.token_ids for r in exited_adapted] != [r.token_ids for r in exited_plain]


def test_fitted_adapters_move_intermediate_readouts_towards_the_final_one(smollm2):
    traces = record_traces(smollm2, load_prompts("calibration")[:6], max_new_tokens=12)
    adapters = fit_exit_adapters(traces.hidden, layers=[24, 28], rank=32)
    final = traces.hidden[:, -1]
    for layer in (24, 28):
        before = traces.hidden[:, layer - 1]
        after = adapters.map_layer(layer, before)
        cosine_before = torch.cosine_similarity(before, final, dim=-1).mean()
        cosine_after = torch.cosine_similarity(after, final, dim=-1).mean()
        assert cosine_after > cosine_before + 0.05, layer


def test_quality_report_files_are_produced_and_readable(smollm2, tmp_path):
    import matplotlib.image

    folder = tmp_path / "prompts"
    folder.mkdir()
    for name, items in {"cal": load_prompts("calibration")[:4], "held": load_prompts("heldout")[:2]}.items():
        lines = [json.dumps({"chat": p.chat, "prompt": p.prompt}) for p in items if isinstance(p.prompt, str)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    grid = SweepGrid(
        taus=[0.95, 0.98, 0.99],
        ks=[2, 3],
        min_layers=[1, 20],
        windows=[(2, 3)],
        window_min_layers=[1],
        v6_quantiles=[0.0, 0.2, 0.5],
        calm_thresholds=[0.5, 0.9],
        calm_min_layers=[1, 20],
    )
    bench = QualityBench(
        smollm2,
        targets=[0.9],
        max_new_tokens=8,
        fit_adapters=True,
        wallclock_rounds=1,
        calibration_prompts=str(folder / "cal.jsonl"),
        eval_prompts=str(folder / "held.jsonl"),
        grid=grid,
        wallclock_prompts=1,
        wallclock_tokens=3,
        adapter_rank=16,
        progress=False,
        cache=False,
    )
    paths = bench.run(tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "quality.json",
            "quality.md",
            "quality_pareto.png",
            "quality_exit_layers.png",
            "quality_stability.png",
        ]
    )
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    families = {(row["family"], row["readout"]) for row in report["rows"]}
    for family in (V7, WINDOW, V6, CALM, ORACLE, STABLE_ORACLE):
        assert (family, "plain") in families and (family, "adapters") in families
    assert (NO_EXIT, "plain") in families
    # Probe families read the plain head (their probes are labelled by it).
    assert {(PROBE, "plain"), (V7_PROBE, "plain")} <= families
    assert not {(PROBE, "adapters"), (V7_PROBE, "adapters")} & families
    engine_rows = [
        r for r in report["rows"] if r["family"] in (V7, WINDOW, PROBE, V7_PROBE) and r.get("setting")
    ]
    assert {r["family"] for r in engine_rows} & {PROBE, V7_PROBE}  # a probe policy ran in the engine
    for row in engine_rows:
        assert {"heldout_runtime", "heldout_free_running", "wallclock", "wallclock_batch8"} <= set(row)
        assert row["wallclock_batch8"]["batch"] == 8
    assert report["pareto"]["plain"]["heldout"][ORACLE][-1][0] == 1.0
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "| policy |" in table and "oracle" in table and "V6 entropy" in table
    for name in ("quality_pareto.png", "quality_exit_layers.png", "quality_stability.png"):
        image = matplotlib.image.imread(tmp_path / "out" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
