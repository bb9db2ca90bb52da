"""ZeRO's optimizer step on 2 CPU processes: layer-decay groups a rank holds nothing of
do not trip the non-finite guard, the updated shards go out as one bucket per rank, and an
fp16 overflow is skipped without the host waiting for the device."""
import json
import os
import subprocess
import sys

from helpers.runs import ROOT, free_port


def test_zero_step_with_layer_decay_and_bucket_views(tmp_path):
    worker = os.path.join(ROOT, 'tests', 'helpers', 'zero_worker.py')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', str(free_port()), worker, str(tmp_path)],
                            env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob('rank*.json'))]
    assert sorted(r['rank'] for r in ranks) == [0, 1]
    assert any(r['empty_first_group'] for r in ranks)  # the case the guard must survive
    for r in ranks:
        assert r['changed'] >= r['moving'] > 100  # every weight with a gradient moved (decay moves others)
        assert r['broadcasts'] <= 2  # one bucket per rank, not one broadcast per tensor
        assert r['fp16_skipped'] and r['fp16_item_calls'] == 0
        assert r['fp16_scale'] == 512.0  # the scaler backed off, on the device
