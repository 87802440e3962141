"""A finished trial is one whose result.json parses and whose checkpoint is there; the checkpoint's
bytes are checked against the recorded SHA-256 when asked (once per stage, before it decides what
to run)."""

from __future__ import annotations

import logging

from overinterp import fs
from overinterp.models import ModelSpec, build, save_checkpoint
from overinterp.pipeline.trial import TrialSpec, checkpoint_path, load_result, result_path

SPEC = TrialSpec("digits_cnn", 0)


def _finished(out: str) -> dict:
    ckpt = checkpoint_path(out, SPEC)
    result = {"name": SPEC.name, "accuracy": 0.5, "checkpoint": ckpt,
              "checkpoint_sha256": save_checkpoint(ckpt, ModelSpec("digits_cnn", 10, 1), build(ModelSpec("digits_cnn", 10, 1)))}
    fs.write_json(result_path(out, SPEC), result)
    return result


def test_a_checkpoint_changed_in_place_is_caught_by_its_hash_and_a_missing_one_always(tmp_path, caplog):
    out = str(tmp_path)
    result = _finished(out)
    assert load_result(out, SPEC) == result == load_result(out, SPEC, verify_checkpoint=False)
    ckpt = tmp_path / "trials" / SPEC.name / "model.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, the same size: torch.load would not notice
    ckpt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="overinterp.pipeline.trial"):
        assert load_result(out, SPEC) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"trial {SPEC.name} in {out} will be retrained: its checkpoint does not match the one it recorded (truncated or replaced)"]
    assert load_result(out, SPEC, verify_checkpoint=False) == result  # the results after a stage: no read of model.pt
    ckpt.unlink()
    assert load_result(out, SPEC) is None and load_result(out, SPEC, verify_checkpoint=False) is None


def test_an_unfinished_trial_has_no_result(tmp_path):
    assert load_result(str(tmp_path), SPEC) is None


def test_a_result_that_does_not_parse_is_retrained(tmp_path, caplog):
    out = str(tmp_path)
    _finished(out)
    path = tmp_path / "trials" / SPEC.name / "result.json"
    for broken in (b'{"accuracy": 0.5, "checkp', b"[1, 2]", b'{"accuracy": 0.5}'):  # cut short, not an object, no checkpoint
        path.write_bytes(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="overinterp.pipeline.trial"):
            assert load_result(out, SPEC) is None
        assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"trial {SPEC.name} in {out} will be retrained"], broken
