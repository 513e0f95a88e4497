"""Config: the paper's recipe as defaults, presets = the model factories, CLI/file overrides, bad values."""

from __future__ import annotations

import json

import pytest
import torch

from fastmae.config import PRESETS, Config, accum_iter, effective_batch, learning_rate, make_config, parse_config
from fastmae.model import MODELS


def test_defaults_are_the_papers_recipe():
    cfg = make_config({"preset": "mae_vit_large_patch16"})
    assert cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.05 and cfg.blr == 1.5e-4
    assert cfg.epochs == 800 and cfg.warmup_epochs == 40 and cfg.mask_ratio == 0.75 and cfg.norm_pix_loss
    assert cfg.effective_batch == 4096 and cfg.batch_size == 64
    assert accum_iter(cfg, world_size=8) == 8  # the seed's 8 GPUs x 64 x accum 8
    assert effective_batch(cfg, 8) == 4096
    assert learning_rate(cfg, 8) == pytest.approx(1.5e-4 * 4096 / 256)
    assert learning_rate(make_config({"preset": "mae_vit_large_patch16", "lr": 1e-3}), 8) == 1e-3


@pytest.mark.parametrize("name", ["mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"])
def test_paper_presets_match_the_model_factories(name):
    with torch.device("meta"):
        m = MODELS[name]()
    cfg = make_config({"preset": name})
    assert cfg.patch_size == m.patch_size and cfg.img_size == m.patch_embed.img_size[0]
    assert cfg.embed_dim == m.cls_token.shape[-1] and cfg.depth == len(m.blocks)
    assert cfg.num_heads == m.blocks[0].attn.num_heads
    assert cfg.decoder_embed_dim == m.mask_token.shape[-1] and cfg.decoder_depth == len(m.decoder_blocks)
    assert cfg.decoder_num_heads == m.decoder_blocks[0].attn.num_heads
    assert cfg.mlp_ratio == m.blocks[0].mlp.fc1.out_features / cfg.embed_dim


def test_cli_overrides_every_kind_of_field(tmp_path):
    cfg = parse_config(
        [
            "--preset",
            "demo",
            "--depth",
            "2",
            "--blr",
            "1e-3",
            "--no-norm-pix-loss",
            "--compile",
            "--betas",
            "0.8",
            "0.9",
        ]
    )
    assert (cfg.depth, cfg.blr, cfg.norm_pix_loss, cfg.compile, cfg.betas) == (2, 1e-3, False, True, (0.8, 0.9))
    assert cfg.embed_dim == PRESETS["demo"]["embed_dim"] and cfg.fused is None  # untouched: preset / auto


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"preset": "demo", "depth": 3, "seed": 7, "resolved": {"lr": 1.0}}))
    cfg = parse_config(["--config", str(path), "--seed", "8"])
    assert (cfg.depth, cfg.seed) == (3, 8)
    saved = tmp_path / "saved.json"  # a saved config reads back to the same Config
    saved.write_text(json.dumps(cfg.to_dict()))
    assert parse_config(["--config", str(saved)]) == cfg


def test_a_runs_saved_config_as_a_recipe_leaves_where_and_how_far_it_ran(tmp_path):
    """A run's config.json (it has "resolved") given as --config: its recipe, not its run directory,
    its resume, its --max-steps or its device (which made a new run continue the old one)."""
    saved = tmp_path / "config.json"
    old = {**Config(depth=3, seed=7).to_dict(), "run_dir": str(tmp_path / "old"), "resume": "auto", "max_steps": 40}
    saved.write_text(json.dumps({**old, "device": "cpu", "resolved": {"lr": 1.0}}))
    cfg = parse_config(["--config", str(saved)])
    assert (cfg.depth, cfg.seed) == (3, 7)
    assert (cfg.run_dir, cfg.resume, cfg.max_steps, cfg.device) == ("", "", 0, "auto")


def test_resuming_reads_the_runs_config_under_a_config_file_and_flags(tmp_path):
    """The run's saved config is the base whichever way the run is named (--run-dir, or --resume
    with a checkpoint path alone), a --config file over it, the flags over both."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**Config(depth=3, seed=7, blr=1e-3).to_dict(), "resolved": {}}))
    (run / "ckpt-step000000008.pt").write_bytes(b"")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"blr": 2e-3}))
    for argv in (["--run-dir", str(run), "--resume", "auto"], ["--resume", str(run / "ckpt-step000000008.pt")]):
        cfg = parse_config([*argv, "--config", str(recipe), "--seed", "9"])
        assert (cfg.depth, cfg.blr, cfg.seed) == (3, 2e-3, 9), argv


def test_optional_fields_go_back_to_auto_and_blr_outranks_a_saved_lr(tmp_path):
    """A run started with --lr, --compile or --fused kept them on resume with no way back: ``auto``
    sets them back, and --blr alone now means blr's lr (a saved lr silently won over it)."""
    run = tmp_path / "run"
    run.mkdir()
    saved = Config(lr=1e-3, compile=True, fused=False).to_dict()
    (run / "config.json").write_text(json.dumps({**saved, "resolved": {}}))
    (run / "ckpt-step000000008.pt").write_bytes(b"")
    resume = ["--run-dir", str(run), "--resume", "auto"]
    assert (parse_config(resume).lr, parse_config(resume).compile) == (1e-3, True)
    cfg = parse_config([*resume, "--lr", "auto", "--compile", "auto", "--fused", "auto"])
    assert (cfg.lr, cfg.compile, cfg.fused) == (None, None, None)
    cfg = parse_config([*resume, "--blr", "2e-3"])
    assert (cfg.lr, cfg.blr) == (None, 2e-3)
    assert parse_config([*resume, "--blr", "2e-3", "--lr", "5e-4"]).lr == 5e-4
    assert (parse_config(["--compile"]).compile, parse_config(["--no-compile"]).compile) == (True, False)
    recipe = tmp_path / "auto.json"  # a config file says it as the flags do (or null)
    recipe.write_text(json.dumps({"lr": "auto", "compile": "auto", "fused": None}))
    cfg = parse_config([*resume, "--config", str(recipe)])
    assert (cfg.lr, cfg.compile, cfg.fused) == (None, None, None)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--compile", "yes"], "--compile takes no value, or auto"),
        (["--no-fused", "auto"], "unrecognized arguments: auto"),
    ],
)
def test_auto_bool_flags_refuse_other_values(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_resuming_on_other_processes_keeps_the_runs_effective_batch(tmp_path):
    """A run whose effective batch was batch x processes (effective_batch 0, the demo's) resumed on
    another number of processes keeps the batch it ran (accumulation makes it up): the summary's
    "continue" command after a 2-process torchrun run was refused on one process."""
    run = tmp_path / "run"
    run.mkdir()
    ran = {**Config(batch_size=64, effective_batch=0).to_dict(), "resolved": {"effective_batch": 128}}
    (run / "config.json").write_text(json.dumps(ran))
    argv = ["--run-dir", str(run), "--resume", "auto"]
    # a start that never saved (killed before its first checkpoint): --resume auto starts afresh, as asked
    assert parse_config(argv).effective_batch == 0
    (run / "ckpt-step000000004.pt").write_bytes(b"")
    cfg = parse_config(argv)
    assert cfg.effective_batch == 128 and accum_iter(cfg, 1) == 2
    assert parse_config([*argv, "--effective-batch", "0"]).effective_batch == 0  # the flags still win
    assert parse_config(["--config", str(run / "config.json")]).effective_batch == 0  # a new run: its recipe
    # a fixed accumulation (batch 64 x 1 process x 2 = 128) resumed on 2 processes: the batch it ran
    # is kept, the accumulation follows (it was refused, and the hint's --effective-batch 128 with it)
    (run / "config.json").write_text(json.dumps({**ran, "accum_iter": 2}))
    cfg = parse_config(argv)
    assert (cfg.effective_batch, cfg.accum_iter, accum_iter(cfg, 1), accum_iter(cfg, 2)) == (128, 0, 2, 1)
    assert accum_iter(parse_config([*argv, "--effective-batch", "128"]), 2) == 1
    assert accum_iter(parse_config([*argv, "--accum-iter", "3"]), 2) == 3  # the flag still wins
    assert accum_iter(parse_config(["--config", str(run / "config.json"), "--effective-batch", "256"]), 1) == 4
    # the recipe file repeated on resume (it names effective batch 4096; the run ran 64 x 4 = 256 with
    # --accum-iter 4): the run's batch, not the file's (it was refused: "trained with 256, this run's 4096")
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"batch_size": 64, "effective_batch": 4096}))
    saved = {
        **Config(batch_size=64, effective_batch=4096, accum_iter=4).to_dict(),
        "resolved": {"effective_batch": 256},
    }
    (run / "config.json").write_text(json.dumps(saved))
    cfg = parse_config(["--config", str(recipe), *argv])
    assert (cfg.effective_batch, accum_iter(cfg, 1), accum_iter(cfg, 2)) == (256, 4, 2)


def test_data_paths_are_kept_absolute(tmp_path, monkeypatch):
    """A run started with a relative --data-path resumes from another working directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "list.txt").write_text("a.jpg\n")
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(["--data-path", "data", "--data-list", "list.txt"])
    assert (cfg.data_path, cfg.data_list) == (str(tmp_path / "data"), str(tmp_path / "list.txt"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("keep_last", "2", "keep_last must be int, got '2'"),
        ("compile", "false", "compile must be bool, null or \"auto\", got 'false'"),  # bool("false") would be True
        ("norm_pix_loss", 0, "norm_pix_loss must be bool, got 0"),
        ("epochs", True, "epochs must be int, got True"),
        ("lr", "1e-3", "lr must be float, null or \"auto\", got '1e-3'"),
        ("betas", 0.9, "betas must be a list of 2 floats, got 0.9"),
        ("betas", [0.9, "0.95"], "betas must be a list of 2 floats"),
    ],
)
def test_config_file_types_are_checked(tmp_path, field, value, message, capsys):
    # argparse converts and checks a flag's type; a value from a config file meets the same check
    path = tmp_path / "run.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(SystemExit) as e:
        parse_config(["--config", str(path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_config_file_numbers_and_nulls_convert(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"blr": 1, "lr": None, "betas": [0, 0.5], "compile": None, "warmup_epochs": 2}))
    cfg = parse_config(["--config", str(path)])
    assert cfg.blr == 1.0 and isinstance(cfg.blr, float) and cfg.lr is None and cfg.compile is None
    assert cfg.betas == (0.0, 0.5) and isinstance(cfg.warmup_epochs, float)


@pytest.mark.parametrize(
    "field, value", [("activation_checkpointing", "some"), ("precision", "fp8"), ("decoder_attn_backend", "flash3")]
)
def test_config_file_choices_are_checked(tmp_path, field, value, capsys):
    # argparse checks a flag's choices; a value from a config file meets the same check.
    path = tmp_path / "run.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(SystemExit) as e:
        parse_config(["--config", str(path)])
    assert e.value.code == 2
    assert f"{field} must be one of" in capsys.readouterr().err.strip().splitlines()[-1]


def test_activation_checkpointing_reaches_the_model():
    from fastmae import config
    from fastmae.model import ACTIVATION_CHECKPOINTING
    from fastmae.train import build_model

    # config keeps its copy torch-free, plus "auto", which the trainer resolves
    assert config.ACTIVATION_CHECKPOINTING == ("auto", *ACTIVATION_CHECKPOINTING)

    cfg = parse_config(["--activation-checkpointing", "selective"])
    assert build_model(cfg, torch.device("cpu")).activation_checkpointing == "selective"
    assert parse_config([]).activation_checkpointing == "auto"
    assert build_model(parse_config([]), torch.device("cpu")).activation_checkpointing == "none"


def test_decoder_attention_backend_reaches_the_model():
    from fastmae.train import build_model

    same = build_model(parse_config(["--attn-backend", "math"]), torch.device("cpu"))
    assert same.decoder_attn_backend == same.attn_backend == "math"
    cfg = parse_config(["--attn-backend", "math", "--decoder-attn-backend", "sdpa_pad64"])
    m = build_model(cfg, torch.device("cpu"))
    assert (m.attn_backend, m.decoder_attn_backend) == ("math", "sdpa_pad64")
    assert {b.attn.backend for b in m.decoder_blocks} == {"sdpa_pad64"} and m.blocks[0].attn.backend == "math"


@pytest.mark.parametrize(
    "device, compiled, expected",
    [("cuda", True, "selective"), ("cuda:1", True, "selective"), ("cuda", False, "none"), ("cpu", True, "none")],
)
def test_auto_activation_checkpointing_is_selective_only_when_compiled_on_cuda(device, compiled, expected):
    """Compiled, selective cost <1% on the H200 for 0.6x the peak; eager it costs 1.5x the step."""
    from fastmae.model import resolve_activation_checkpointing

    assert resolve_activation_checkpointing("auto", device, compiled) == expected
    for explicit in ("none", "gelu", "selective", "full"):
        assert resolve_activation_checkpointing(explicit, device, compiled) == explicit


def test_help_lists_presets_and_fields(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    for flag in ("--mask-ratio", "--effective-batch", "--no-compile", "--resume", "--config"):
        assert flag in out
    assert "(default: 0.75)" in out


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--preset", "mae_vit_gigantic"], 1, "invalid choice"),
        (["--img-size", "60"], 1, "not divisible by the patch size 8"),
        (["--mask-ratio", "1.0"], 1, "mask ratio must be in [0, 1)"),
        (["--mask-ratio", "-0.1"], 1, "mask ratio must be in [0, 1)"),
        (["--mask-ratio", "0"], 1, "removes no patch of a 64 px image (64 patches)"),  # was a 0/0 loss
        (["--batch-size", "48", "--effective-batch", "4096"], 3, "not divisible by batch_size 48 x 3"),
        (["--batch-size", "64", "--effective-batch", "64"], 2, "change --batch-size (--batch-size 32 keeps it)"),
        (["--data-path", "/nonexistent/imagenet"], 1, "does not exist"),
        (["--preset", "mae_vit_base_patch16"], 1, "needs --data-path"),
        (["--depth", "two"], 1, "invalid int value"),
        (["--embed-dim", "100", "--num-heads", "3"], 1, "not divisible by num_heads"),
        (["--activation-checkpointing", "some"], 1, "invalid choice"),
        (["--compile-mode", "fast"], 1, "invalid choice"),
        (["--residual-dtype", "bf16"], 1, "invalid choice"),
        (["--patch-size", "0"], 1, "need 1 <= patch size <= image size"),
        (["--img-size", "-32"], 1, "need 1 <= patch size <= image size"),
        (["--embed-dim", "0"], 1, "embed_dim must be >= 1"),
        (["--decoder-depth=-1"], 1, "decoder_depth must be >= 0"),  # 0: a linear decoder, allowed
        (["--depth", "0"], 1, "depth must be >= 1"),
        (["--mlp-ratio", "0"], 1, "mlp_ratio must be > 0"),
        (["--dist-timeout", "0"], 1, "dist_timeout must be > 0 minutes"),
        (["--lr", "-1"], 1, "lr must be >= 0"),
        (["--blr=-1e-4"], 1, "blr must be >= 0"),
        (["--weight-decay", "-0.05"], 1, "weight_decay must be >= 0"),
        (["--betas", "0.9", "1.5"], 1, "betas must be two numbers in [0, 1)"),
        (["--seed", "-1"], 1, "seed must be >= 0"),
        (["--keep-every-epochs", "-1"], 1, "keep_every_epochs must be >= 0"),
        (["--vis-every-epochs", "-1"], 1, "vis_every_epochs must be >= 0"),
        (["--device", "foo"], 1, "device must be auto, cpu, cuda or cuda:N"),
        (["--blr", "nan"], 1, "blr must be a finite number, got nan"),
        (["--lr", "inf"], 1, "lr must be a finite number, got inf"),
        (["--mlp-ratio", "nan"], 1, "mlp_ratio must be a finite number"),
        (["--weight-decay", "nan"], 1, "weight_decay must be a finite number"),
        (["--betas", "0.9", "nan"], 1, "betas must be a finite number"),
        (["--data-list", "README.md"], 1, "--data-list needs --data-path"),
        (["--data-path", ".", "--data-list", "tests"], 1, "--data-list tests is a folder, not a file list"),
        (["--resume", "tests"], 1, "--resume tests is a folder: pass --run-dir tests --resume auto"),
        (["--run-dir", "README.md"], 1, "--run-dir README.md is a file, not a folder"),
        (["--config", "tests"], 1, "config file tests is a folder"),
    ],
)
def test_bad_values_are_one_line_errors(argv, world, message, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err  # one line: no usage block, no traceback


def test_config_is_a_typed_dataclass():
    assert Config().preset == "demo"
    assert all(f in Config.__dataclass_fields__ for f in ("lr", "accum_iter", "attn_backend", "keep_last"))
