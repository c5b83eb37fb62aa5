"""The compact student form: a low-rank delta from a base, rebuilt into the student's weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from uniner import delta


def tiny_model(folder, *, seed: int) -> dict[str, torch.Tensor]:
    """A small Llama saved as a Hugging Face folder; returns its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return load_file(folder / delta.WEIGHTS)


def fine_tuned(base, student_folder, *, rank: int) -> dict[str, torch.Tensor]:
    """The base folder copied with every matrix moved by an exact rank-`rank` change and every vector moved."""
    torch.manual_seed(1)
    weights = {}
    for name, weight in load_file(base / delta.WEIGHTS).items():
        if weight.dim() == 2:
            weight = weight + 0.05 * torch.randn(weight.shape[0], rank) @ torch.randn(rank, weight.shape[1])
        else:
            weight = weight + 0.1 * torch.randn_like(weight)
        weights[name] = weight.contiguous()
    student_folder.mkdir()
    save_file(weights, student_folder / delta.WEIGHTS, metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (student_folder / "config.json").write_text(json.dumps({**config, "uniner_marker": "student"}))
    return weights


def export(tmp_path, name: str, **settings) -> dict:
    """Export tmp_path/student's delta from tmp_path/base to tmp_path/NAME."""
    return delta.export(student=tmp_path / "student", base=tmp_path / "base", output=tmp_path / name, **settings)


def test_a_low_rank_change_round_trips_within_fp16(tmp_path):
    base = tmp_path / "base"
    tiny_model(base, seed=0)
    student = fine_tuned(base, tmp_path / "student", rank=2)
    report = export(tmp_path, "d.safetensors", rank=4, embedding_rank=4, residual_bits=0)
    assert report["energy_kept"] > 0.999
    delta.rebuild(base=base, delta=tmp_path / "d.safetensors", output=tmp_path / "rebuilt")
    rebuilt = load_file(tmp_path / "rebuilt" / delta.WEIGHTS)
    assert set(rebuilt) == set(student)
    for name, weight in student.items():
        torch.testing.assert_close(rebuilt[name], weight, atol=2e-3, rtol=1e-3)
    assert json.loads((tmp_path / "rebuilt" / "config.json").read_text())["uniner_marker"] == "student"


def test_a_rank_below_the_change_keeps_less_and_is_smaller(tmp_path):
    base = tmp_path / "base"
    tiny_model(base, seed=0)
    fine_tuned(base, tmp_path / "student", rank=8)
    full = export(tmp_path, "a.safetensors", rank=8, embedding_rank=8, residual_bits=0)
    cut = export(tmp_path, "b.safetensors", rank=2, embedding_rank=2, residual_bits=0)
    assert cut["energy_kept"] < 0.9 < full["energy_kept"]
    assert cut["bytes"] < full["bytes"]


def test_embedding_rank_zero_keeps_the_base_embedding_and_stores_none_of_it(tmp_path):
    base = tmp_path / "base"
    original = tiny_model(base, seed=0)
    student = fine_tuned(base, tmp_path / "student", rank=2)
    with_embedding = export(tmp_path, "a.safetensors", rank=4, embedding_rank=4, residual_bits=1)
    without = export(tmp_path, "b.safetensors", rank=4, embedding_rank=0, residual_bits=1)
    assert without["bytes"] < with_embedding["bytes"] and without["energy_kept"] < with_embedding["energy_kept"]
    assert not any("embed" in key for key in load_file(tmp_path / "b.safetensors"))
    delta.rebuild(base=base, delta=tmp_path / "b.safetensors", output=tmp_path / "rebuilt")
    rebuilt = load_file(tmp_path / "rebuilt" / delta.WEIGHTS)
    assert torch.equal(rebuilt["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    layer = "model.layers.0.mlp.up_proj.weight"  # an exact rank-2 change, stored whole at rank 4
    torch.testing.assert_close(rebuilt[layer], student[layer], atol=2e-3, rtol=1e-3)


def test_a_delta_refuses_another_base(tmp_path):
    tiny_model(tmp_path / "base", seed=0)
    tiny_model(tmp_path / "other", seed=3)
    fine_tuned(tmp_path / "base", tmp_path / "student", rank=2)
    export(tmp_path, "d.safetensors")
    with pytest.raises(ValueError, match="another base"):
        delta.rebuild(base=tmp_path / "other", delta=tmp_path / "d.safetensors", output=tmp_path / "rebuilt")


def test_a_one_bit_residual_keeps_more_and_the_rebuild_is_what_export_measured(tmp_path):
    base = tmp_path / "base"
    tiny_model(base, seed=0)
    student = fine_tuned(base, tmp_path / "student", rank=16)
    plain = export(tmp_path, "a.safetensors", rank=2, embedding_rank=2, residual_bits=0)
    hybrid = export(tmp_path, "b.safetensors", rank=2, embedding_rank=2, residual_bits=1)
    assert plain["energy_kept"] < hybrid["energy_kept"] < 1
    delta.rebuild(base=base, delta=tmp_path / "b.safetensors", output=tmp_path / "rebuilt")
    rebuilt, original = load_file(tmp_path / "rebuilt" / delta.WEIGHTS), load_file(base / delta.WEIGHTS)
    matrices = [name for name in student if student[name].dim() == 2]
    missed = sum(float((student[n] - rebuilt[n]).square().sum()) for n in matrices)
    total = sum(float((student[n] - original[n]).square().sum()) for n in matrices)
    vectors = sum(float((student[n] - original[n]).square().sum()) for n in student if n not in matrices)
    assert 1 - missed / (total + vectors) == pytest.approx(hybrid["energy_kept"], rel=1e-3)


def test_students_average_weight_by_weight_and_their_mean_exports_like_a_student(tmp_path):
    base = tmp_path / "base"
    original = tiny_model(base, seed=0)
    first = fine_tuned(base, tmp_path / "student", rank=1)
    second = {name: original[name] + 3 * (weight - original[name]) for name, weight in first.items()}
    (tmp_path / "second").mkdir()
    save_file(second, tmp_path / "second" / delta.WEIGHTS, metadata={"format": "pt"})
    students = [tmp_path / "student", tmp_path / "second"]
    delta.average(students=students, output=tmp_path / "mean")
    delta.export(student=tmp_path / "mean", base=base, output=tmp_path / "d.safetensors", rank=4, residual_bits=0)
    delta.rebuild(base=base, delta=tmp_path / "d.safetensors", output=tmp_path / "rebuilt")
    rebuilt, mean = load_file(tmp_path / "rebuilt" / delta.WEIGHTS), load_file(tmp_path / "mean" / delta.WEIGHTS)
    assert json.loads((tmp_path / "mean" / "config.json").read_text())["uniner_marker"] == "student"
    for name, weight in first.items():
        expected = original[name] + 2 * (weight - original[name])
        torch.testing.assert_close(mean[name], expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rebuilt[name], expected, atol=2e-3, rtol=1e-3)


def test_weighted_mean_gives_each_student_its_share(tmp_path):
    base = tmp_path / "base"
    original = tiny_model(base, seed=0)
    first = fine_tuned(base, tmp_path / "student", rank=1)
    (tmp_path / "second").mkdir()
    save_file(original, tmp_path / "second" / delta.WEIGHTS, metadata={"format": "pt"})
    mean = delta.averaged_weights([tmp_path / "student", tmp_path / "second"], [2, 1])
    for name, weight in first.items():
        torch.testing.assert_close(mean[name], (2 * weight + original[name]) / 3, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="one positive weight per student"):
        delta.averaged_weights([tmp_path / "student", tmp_path / "second"], [1])


def test_the_base_as_a_student_pulls_the_mean_back_toward_it(tmp_path):
    base = tmp_path / "base"
    original = tiny_model(base, seed=0)
    tuned = fine_tuned(base, tmp_path / "student", rank=1)
    delta.average(students=[tmp_path / "student", base], output=tmp_path / "pulled", weights=[4, 1])
    pulled = load_file(tmp_path / "pulled" / delta.WEIGHTS)
    for name, weight in tuned.items():
        torch.testing.assert_close(pulled[name], original[name] + 0.8 * (weight - original[name]), atol=1e-6, rtol=1e-6)


def test_weights_that_are_not_numbers_are_one_line_and_write_nothing(tmp_path):
    tiny_model(tmp_path / "base", seed=0)
    fine_tuned(tmp_path / "base", tmp_path / "student", rank=1)
    result = subprocess.run(
        [sys.executable, "-m", "uniner.delta", "average", "--student", f"{tmp_path / 'student'},{tmp_path / 'base'}"]
        + ["--weights", "2,x", "--output", str(tmp_path / "mean")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0
    assert "give numbers separated by commas" in result.stderr and not (tmp_path / "mean").exists()


def test_a_wrong_count_of_weights_is_reported_before_any_model_is_looked_up(tmp_path):
    missing = [str(tmp_path / "not-made-yet"), str(tmp_path / "nor-this")]
    result = subprocess.run(
        [sys.executable, "-m", "uniner.delta", "average", "--student", ",".join(missing)]
        + ["--weights", "1", "--output", str(tmp_path / "mean")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0
    assert "1 weights for 2 students" in result.stderr and not (tmp_path / "mean").exists()


def test_students_of_other_shapes_are_not_averaged(tmp_path):
    tiny_model(tmp_path / "base", seed=0)
    fine_tuned(tmp_path / "base", tmp_path / "student", rank=1)
    (tmp_path / "other").mkdir()
    save_file({"lm_head.weight": torch.zeros(2, 2)}, tmp_path / "other" / delta.WEIGHTS)
    with pytest.raises(ValueError, match="average students of one base"):
        delta.averaged_weights([tmp_path / "student", tmp_path / "other"])


def test_averaging_one_model_is_one_line_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "uniner.delta", "average", "--student", "only-one", "--output", str(tmp_path / "mean")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0
    assert "give two or more" in result.stderr and not (tmp_path / "mean").exists()


def test_signs_and_scales_round_trip_any_width():
    residual = torch.randn(5, 13)
    packed, scales = delta.signs_and_scales(residual)
    assert packed.shape == (5, 2) and scales.dtype == torch.float16
    restored = delta.from_signs(packed, scales, 13)
    assert torch.equal(restored.sign(), residual.sign())
    torch.testing.assert_close(restored.abs().mean(dim=1), residual.abs().mean(dim=1), atol=1e-3, rtol=1e-3)


def test_signs_fitted_to_the_inputs_err_less_on_them_than_the_residuals_own_signs():
    torch.manual_seed(0)
    residual = torch.randn(24, 40)
    samples = torch.randn(500, 6) @ torch.randn(6, 40) + 0.1 * torch.randn(500, 40)  # inputs in few directions
    inputs = samples.T @ samples / len(samples)

    def output_error(packed, scales) -> float:
        error = residual - delta.from_signs(packed, scales, 40)
        return float(((error @ inputs) * error).sum())

    assert output_error(*delta.signs_and_scales(residual, inputs)) < 0.5 * output_error(
        *delta.signs_and_scales(residual)
    )


def test_a_calibrated_export_keeps_more_of_the_outputs_and_rebuilds_what_it_reported(tmp_path, tiny_model_dir):
    from importlib import resources

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    fine_tuned(tmp_path / "base", tmp_path / "student", rank=16)
    delta.copy_files(delta.TOKENIZER_FILES, source=tmp_path / "base", output=tmp_path / "student")
    calibration = tmp_path / "conversations.json"
    calibration.write_text(resources.files("uniner.data").joinpath("pile_ner_sample/pile-ner-heldout.json").read_text())
    plain = export(tmp_path, "plain.safetensors", rank=2, embedding_rank=0)
    fitted = export(
        tmp_path, "fitted.safetensors", rank=2, embedding_rank=0, calibration=calibration, calibration_conversations=6
    )
    assert "output_kept" not in plain
    student, original = load_file(tmp_path / "student" / delta.WEIGHTS), load_file(tmp_path / "base" / delta.WEIGHTS)
    moments = delta.input_moments(tmp_path / "student", delta.calibration_conversations_of(calibration, 6))
    moments = {name: moment for name, moment in moments.items() if name in student}  # the tied head is the embedding

    def output_kept(name: str) -> float:
        delta.rebuild(base=tmp_path / "base", delta=tmp_path / name, output=tmp_path / f"rebuilt-{name}")
        rebuilt = load_file(tmp_path / f"rebuilt-{name}" / delta.WEIGHTS)
        missed = sum(
            float(((student[n] - rebuilt[n]) @ h * (student[n] - rebuilt[n])).sum()) for n, h in moments.items()
        )
        total = sum(
            float(((student[n] - original[n]) @ h * (student[n] - original[n])).sum()) for n, h in moments.items()
        )
        return 1 - missed / total

    assert output_kept("plain.safetensors") < output_kept("fitted.safetensors")
    assert output_kept("fitted.safetensors") == pytest.approx(fitted["output_kept"], rel=1e-3)
    with safe_open(tmp_path / "fitted.safetensors", framework="pt") as stored:
        assert stored.metadata()["calibration"] == "conversations.json, 6 conversations"


def test_a_calibration_that_cannot_be_used_is_one_line_and_writes_nothing(tmp_path):
    tiny_model(tmp_path / "base", seed=0)
    fine_tuned(tmp_path / "base", tmp_path / "student", rank=1)
    (tmp_path / "notes.json").write_text('{"text": "not a list"}')
    cases = (
        (tmp_path / "missing.json", [], "No such file"),
        (tmp_path / "notes.json", [], "not a JSON list of UniNER conversations"),
        (tmp_path / "notes.json", ["--residual-bits", "0"], "--residual-bits 0 leaves out"),
    )
    for calibration, options, problem in cases:
        result = subprocess.run(
            [sys.executable, "-m", "uniner.delta", "export", "--student", str(tmp_path / "student")]
            + ["--base", str(tmp_path / "base"), "--calibration", str(calibration), "--output", str(tmp_path / "d")]
            + options,
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
        assert problem in result.stderr and not (tmp_path / "d").exists()
