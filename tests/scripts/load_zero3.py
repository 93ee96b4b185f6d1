"""Run under the deepspeed launcher: load each tiny model given on the command line the way the trainer
loads a teacher (from_pretrained inside zero.Init, frozen ZeRO-3 engine), run a forward, and print
rank shares as JSON lines."""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from distill.runtime.process_group import exit_rank, join_process_group
from distill.config.settings import ModelConfig
from distill.config.parsing import load_config
from distill.runtime.dsconfig import read_ds_config, resolve_ds_config
from distill.models.lm_head import head_of, trunk
from distill.models.loading import auto_class, hidden_size, load_model, load_model_config, rank_param_counts

join_process_group()
run = load_config(None, ["student.path=x", "student.ds_config=x", "data.path=x", "training.output_dir=x",
                         "training.micro_batch_size=2"])
for path in [a for a in sys.argv[1:] if not a.startswith("--")]:  # the launcher adds --local_rank
    mc = ModelConfig(path=path, ds_config="ds_configs/teacher_zero3.json")
    config = load_model_config(mc, "teacher")
    ds = resolve_ds_config(read_ds_config(mc.ds_config, "teacher"), run, "teacher", dist.get_world_size(),
                           hidden_size(config), "cpu", mc.ds_config)
    model, keep = load_model(mc, config, ds, "fp32")
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    ids = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 11, 2, 1]])
    kwargs = {"decoder_input_ids": ids[:, :3]} if config.is_encoder_decoder else {}
    with torch.no_grad():
        logits = engine(input_ids=ids, attention_mask=(ids != 1).long(), **kwargs).logits
        # the fused head's view of the partitioned model: its trunk, the head's transform and matrix
        hidden, _ = trunk(engine.module, input_ids=ids, attention_mask=(ids != 1).long(), **kwargs)
        head = head_of(engine.module)
        fused = head.logits(head.prepare(hidden))  # the transform's modules gather their own weights
    local, total = rank_param_counts(engine.module)
    # The same model loaded whole, without ZeRO: the partitioned one must compute the same logits.
    unset_hf_deepspeed_config()
    plain = auto_class(config).from_pretrained(path).eval()
    with torch.no_grad():
        reference = plain(input_ids=ids, attention_mask=(ids != 1).long(), **kwargs).logits
    if dist.get_rank() == 0:
        print(json.dumps({"path": path, "type": config.model_type, "share": local / total,
                          "max_diff": (logits - reference).abs().max().item(),
                          "fused_diff": (fused - reference).abs().max().item()}), flush=True)
exit_rank(0)
