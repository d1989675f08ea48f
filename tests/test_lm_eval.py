"""EleutherAI's lm-evaluation-harness evaluates a HydraLoRA adapter from its command line, offline, on a local task,
in a fresh environment with peft-hydra installed (as users install it) and no `import peft_hydra` anywhere:

    lm_eval run --model hf --model_args pretrained=BASE_DIR,peft=ADAPTER_DIR --tasks TASK --include_path TASK_DIR \\
        --device cpu --batch_size 1 --output_path OUT --log_samples

lm-eval loads the adapter with PeftModel.from_pretrained after probing for peft with importlib.util.find_spec; the
start-up hook of the package registers HydraLoRA (src/_peft_hydra_autoload.py). The log-likelihoods lm-eval reports
are checked against the adapted model's own.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from conftest import fresh_install, tiny_base_and_adapter

pytest.importorskip("lm_eval")

TASK = """\
task: hydra_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
DOCS = [{"question": f"w{4 + i} w{10 + i} w{20 + i}", "choices": [f"w{30 + i}", f"w{40 + i}"], "answer": i % 2} for i in range(4)]


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval computes it: the tokens of context + continuation, scored after the
    context's tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logprobs[t - 1, whole[t]]) for t in range(n_context, len(whole)))


@pytest.mark.slow
def test_lm_eval_cli_evaluates_a_hydralora_adapter(tmp_path_factory, tmp_path):
    python, _ = fresh_install("regular", tmp_path_factory)
    folder = tiny_base_and_adapter(tmp_path_factory)
    data = tmp_path / "hydra_tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hydra_tiny.yaml").write_text(TASK.format(data=data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    command = [
        str(python), "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={folder / 'base'},peft={folder / 'adapter'}",
        "--tasks", "hydra_tiny", "--include_path", str(tmp_path / "tasks"),
        "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "out"), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "HYDRALORA" not in proc.stderr, proc.stderr[-4000:]

    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert 0.0 <= results["results"]["hydra_tiny"]["acc,none"] <= 1.0
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_hydra_tiny_*.jsonl")).open()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(DOCS)))

    # lm-eval scored with the adapter: its log-likelihoods are the HydraLoRA model's, not the base model's
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder / "base")
    base = LlamaForCausalLM.from_pretrained(folder / "base").eval()
    sample = min(samples, key=lambda s: s["doc_id"])
    context, continuation = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
    reported = float(sample["resps"][0][0][0])
    base_ll = _loglikelihood(base, tokenizer, context, continuation)
    adapted = PeftModel.from_pretrained(base, folder / "adapter").eval()
    assert reported == pytest.approx(_loglikelihood(adapted, tokenizer, context, continuation), rel=1e-4, abs=1e-5)
    assert abs(reported - base_ll) > 1e-3
