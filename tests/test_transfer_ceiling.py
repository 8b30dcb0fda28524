import json

import pytest

from experiments import transfer_ceiling


@pytest.mark.slow
def test_the_ceilings_are_written_for_a_tiny_run(tmp_path):
    out = tmp_path / "ceiling.json"
    transfer_ceiling.main(
        ["--num-clients", "4", "--public-size", "64", "--epochs", "1", "--teacher-epochs", "1", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    for key in ("true_labels", "teacher", "central_teacher"):
        assert 0.0 <= result[key] <= 1.0
    assert result["temperature"] == 4.0
