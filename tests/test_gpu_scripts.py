"""gpu/fit_budgets.py: how a GPU slot's seconds are shared between training and the evaluation."""
import json

import pytest
import yaml

from gpu import fit_budgets


def profile() -> dict:
    return {"vae": {"train": {"max_minutes": 2.5}}, "diffusion": {"train": {"max_minutes": 2.0},
                                                                  "sample": {"guidance_scale": 3.0}},
            "finetune": {"train": {"max_minutes": 0.75}},
            "evaluate": {"batch_size": 90, "fid_samples": 5000, "guidance_scales": [1, 2, 3, 5, 7]}}


def test_held_out_draws_count_the_before_set_and_the_other_guidance_scales():
    assert fit_budgets.held_out_draws({"guidance_scales": [1, 2, 3, 5, 7]}, 3.0, 180) == 180 * 6
    assert fit_budgets.held_out_draws({"guidance_scales": [], "max_captions": 90}, 3.0, 180) == 90 * 2


def test_without_a_sampling_rate_only_the_training_budgets_scale():
    params = profile()
    record = fit_budgets.fit(params, 400, 100)
    assert record["scale"] == pytest.approx(300 / 60 / 5.25, abs=1e-3)
    assert params["evaluate"]["fid_samples"] == 5000
    assert params["vae"]["train"]["max_minutes"] == pytest.approx(2.5 * 300 / 60 / 5.25, abs=1e-3)


def test_the_evaluation_is_sized_to_its_share_then_training_gets_the_rest():
    params = profile()
    record = fit_budgets.fit(params, 400, 100, sprites_per_s=50, eval_share=0.35)
    # room for fid_all: 0.35 * (400 - 100) - 1080 * 1.25 / 50 = 78 s -> 3120 sprites -> 3060 (batches of 90)
    assert params["evaluate"]["fid_samples"] == record["fid_samples"] == 3060
    draw = (1080 + 3060) * 1.25 / 50
    assert record["draw_seconds_estimate"] == pytest.approx(draw, abs=0.1)
    factor = (400 - 100 - draw) / 60 / 5.25
    assert record["scale"] == pytest.approx(factor, abs=1e-3)
    assert params["diffusion"]["train"]["max_minutes"] == pytest.approx(2.0 * factor, abs=1e-3)


def test_a_fast_sampler_keeps_fid_samples_and_budgets_that_fit_stay():
    params = profile()
    record = fit_budgets.fit(params, 2000, 100, sprites_per_s=1000)
    assert params["evaluate"]["fid_samples"] == 5000 and record["scale"] == 1.0
    assert params["finetune"]["train"]["max_minutes"] == 0.75


def test_command_line_reads_the_benchmark_json(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(profile()))
    (tmp_path / "t.json").write_text(json.dumps({"stages": {"sample": {"samples_per_s": 50.0}}}))
    assert fit_budgets.main([str(tmp_path / "p.yaml"), str(tmp_path / "out.yaml"), "400", "--overhead", "100",
                             "--throughput", str(tmp_path / "t.json")]) == 0
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["evaluate"]["fid_samples"] == 3060
    assert json.loads((tmp_path / "fitted_out.json").read_text())["sprites_per_s"] == 50.0
    assert fit_budgets.sampling_rate(tmp_path / "missing.json") is None


def test_set_changes_existing_keys_only(tmp_path):
    params = profile()
    assert fit_budgets.set_keys(params, ["diffusion.sample.guidance_scale=5", "evaluate.guidance_scales=[]"]) == \
        {"diffusion.sample.guidance_scale": 5, "evaluate.guidance_scales": []}
    assert params["diffusion"]["sample"]["guidance_scale"] == 5 and params["evaluate"]["guidance_scales"] == []
    for bad in ("nokey", "vae.train.max_minutes.x=1", "vae.train=1", "nosection.x=1"):
        with pytest.raises(SystemExit, match="--set"):
            fit_budgets.set_keys(profile(), [bad])
    record = fit_budgets.fit(params, 0, 100, sprites_per_s=1.0)  # 0 seconds: keep everything
    assert params["vae"]["train"]["max_minutes"] == 2.5 and params["evaluate"]["fid_samples"] == 5000
    assert "scale" not in record


def test_fallback_rate_applies_only_without_a_measurement(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(profile()))
    args = [str(tmp_path / "p.yaml"), str(tmp_path / "out.yaml"), "400", "--overhead", "100",
            "--throughput", str(tmp_path / "none.json"), "--fallback-rate", "50"]
    fit_budgets.main(args)
    record = json.loads((tmp_path / "fitted_out.json").read_text())
    assert record["sprites_per_s"] == 50.0 and record["sprites_per_s_measured"] is False
    assert record["fid_samples"] == 3060


def test_a_slow_sampler_turns_fid_all_off():
    params = profile()
    record = fit_budgets.fit(params, 400, 100, sprites_per_s=5)  # the held-out draws alone take 270 s
    assert params["evaluate"]["fid_samples"] == 0 and record["draw_seconds_estimate"] == 270.0
    assert params["vae"]["train"]["max_minutes"] == pytest.approx(2.5 * 0.5 / 5.25, abs=1e-3)  # 30 s left


@pytest.mark.parametrize("script", ["gpu/run.sh", "gpu/rehearse.sh"])
def test_the_gpu_scripts_help_and_refuse_an_option_before_touching_any_folder(script, tmp_path):
    """`--help` once became OUT: the usage text was a folder name and the previous run's WORK was deleted."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "work"
    (work / "run").mkdir(parents=True)
    (work / "run" / "last.pt").write_text("a previous run's checkpoint")
    env = {"PATH": "/usr/bin:/bin", "WORK": str(work)}
    shown = subprocess.run(["bash", script, "--help"], cwd=root, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and script in shown.stdout and not shown.stdout.startswith("#")
    refused = subprocess.run(["bash", script, "--budget", "60"], cwd=root, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and f"usage: {script}" in refused.stderr
    assert (work / "run" / "last.pt").read_text() == "a previous run's checkpoint"
