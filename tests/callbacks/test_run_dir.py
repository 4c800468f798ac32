"""Run naming and the run directory: names from method, model and time; a resume continues the
run it belongs to and refuses another project; the CLI offers only what works."""

from pathlib import Path

import pytest
import torch
import yaml

from align.callbacks.run_dir import RUN_NAME_ENV, method_name, model_label, plan_run
from align.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/dpo/tiny.yaml")


def test_names_come_from_method_and_model():
    assert method_name("align.modules.DPOModule") == "dpo"
    assert method_name("align.modules.PreferenceModelModule") == "preference-model"
    assert model_label("tiny") == "tiny"
    assert model_label("stabilityai/stable-diffusion-xl-base-1.0") == "stable-diffusion-xl-base-1.0"
    assert model_label("/weights/my sd15/") == "my-sd15"


def test_new_run_is_named_method_model_time(monkeypatch):
    monkeypatch.delenv(RUN_NAME_ENV, raising=False)
    plan = plan_run("dpo", "tiny", project=None, name=None, root="logs")
    assert plan.project == "align-dpo" and plan.name.startswith("dpo-tiny-")
    assert plan.directory == Path("logs/align-dpo") / plan.name and not plan.resumed
    named = plan_run("dpo", "tiny", project="p", name="mine", root="out")
    assert named.directory == Path("out/p/mine")


def resumable(tmp_path, project="align-dpo", name="dpo-tiny-20260101-000000") -> Path:
    run = tmp_path / "logs" / project / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    ckpt = run / "checkpoints/last.ckpt"
    torch.save({"hyper_parameters": {}}, ckpt)
    return ckpt


def test_resume_continues_the_checkpoints_run(tmp_path):
    ckpt = resumable(tmp_path)
    plan = plan_run("dpo", "tiny", project="align-dpo", name=None, root="elsewhere", ckpt_path=ckpt)
    assert plan.resumed and plan.directory == ckpt.parent.parent.resolve()


def test_resume_into_another_project_is_refused_naming_both(tmp_path):
    ckpt = resumable(tmp_path, project="align-kto")
    with pytest.raises(ValueError, match="project 'align-kto'.*project 'align-dpo'"):
        plan_run("dpo", "tiny", project="align-dpo", name=None, root="logs", ckpt_path=ckpt)


def test_cli_refuses_a_resume_into_another_project(tmp_path, monkeypatch):
    ckpt = resumable(tmp_path, project="align-kto")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["fit", "--config", TINY, "--ckpt_path", str(ckpt)])
    assert "align-kto" in str(err.value.code) and "align-dpo" in str(err.value.code)


def test_test_and_predict_are_not_offered(capsys):
    with pytest.raises(SystemExit) as err:
        main(["test", "--config", TINY])
    assert err.value.code != 0 and "invalid choice" in capsys.readouterr().err


def test_short_class_names_resolve(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", TINY, "--model", "KTOModule", "--print_config"])
    assert done.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"].endswith("KTOModule")
