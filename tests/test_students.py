"""Tests for distill.models (architectures, make_student): layer tables, architecture introspection, make_student."""

import json
import os

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    BertConfig,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MarianConfig,
    MBartConfig,
    MistralConfig,
    ModernBertConfig,
    MT5Config,
    PegasusConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
    T5Config,
    UMT5Config,
    XLMRobertaConfig,
)

from distill.errors import DistillError
from distill.models.make_student import format_layer_map, make_student
from distill.models.architectures import layer_stacks, stack_depths
from distill.models.loading import auto_class
from distill.models.layer_maps import layers_to_copy, layers_to_supervise

# ---------------------------------------------------------------------------------------------
# Layer tables of Shleifer & Rush 2020, "Pre-trained Summarization Distillation" (section 1's tables), written out literally
# ---------------------------------------------------------------------------------------------

PUBLISHED_COPY = {
    12: {
        1: [0],
        2: [0, 6],
        3: [0, 6, 11],
        4: [0, 4, 8, 11],
        6: [0, 2, 4, 7, 9, 11],
        9: [0, 1, 2, 4, 5, 7, 9, 10, 11],
        12: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
    },
    16: {
        1: [0],
        2: [0, 15],
        3: [0, 8, 15],
        4: [0, 5, 10, 15],
        6: [0, 3, 6, 9, 12, 15],
        8: [0, 2, 4, 6, 8, 10, 12, 15],
        9: [0, 1, 3, 5, 7, 9, 11, 13, 15],
        12: [0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15],
        16: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    },
    6: {
        1: [0],
        2: [0, 5],
        3: [0, 2, 5],
        4: [0, 1, 3, 5],
        6: [0, 1, 2, 3, 4, 5],
    },
}

PUBLISHED_SUPERVISE = {
    12: {1: [11], 2: [5, 11], 3: [3, 7, 11], 6: [1, 3, 5, 8, 10, 11]},
    16: {1: [15], 4: [4, 9, 12, 15], 8: [1, 3, 5, 7, 9, 11, 13, 15]},
    6: {1: [5], 2: [3, 5], 3: [1, 4, 5], 4: [1, 2, 4, 5]},
}


def test_layers_to_copy_matches_published_table():
    for n_teacher, row in PUBLISHED_COPY.items():
        for n_student, expected in row.items():
            assert layers_to_copy(n_student, n_teacher) == expected, (n_teacher, n_student)


def test_rule_reproduces_most_of_the_table():
    from distill.models.layer_maps import _COPY_EXCEPTIONS, _spread

    total = sum(len(row) for row in PUBLISHED_COPY.values())
    matched = sum(
        _spread(s, t) == layers for t, row in PUBLISHED_COPY.items() for s, layers in row.items()
    )
    assert matched >= 15 and len(_COPY_EXCEPTIONS) == total - matched


@pytest.mark.parametrize("n_student,n_teacher", [(6, 24), (12, 24), (8, 32), (3, 24), (5, 7), (2, 3)])
def test_rule_keeps_first_and_last_evenly_spread(n_student, n_teacher):
    layers = layers_to_copy(n_student, n_teacher)
    assert len(layers) == n_student
    assert layers[0] == 0 and layers[-1] == n_teacher - 1
    gaps = [b - a for a, b in zip(layers, layers[1:])]
    assert min(gaps) >= 1 and max(gaps) - min(gaps) <= 1
    assert sum(gaps) == n_teacher - 1


def test_rule_large_teachers_literal():
    assert layers_to_copy(6, 24) == [0, 4, 8, 13, 18, 23]
    assert layers_to_copy(8, 32) == [0, 4, 8, 12, 16, 21, 26, 31]


def test_rule_edges():
    assert layers_to_copy(1, 24) == [0]
    assert layers_to_copy(24, 24) == list(range(24))
    assert layers_to_copy(1, 1) == [0]
    with pytest.raises(DistillError, match="more layers"):
        layers_to_copy(13, 12)
    with pytest.raises(DistillError, match="at least 1"):
        layers_to_copy(0, 12)


def test_layers_to_supervise_table():
    for n_teacher, row in PUBLISHED_SUPERVISE.items():
        for n_student, expected in row.items():
            assert layers_to_supervise(n_student, n_teacher) == expected
    assert layers_to_supervise(12, 12) == list(range(12))
    with pytest.raises(DistillError, match=r"12-layer teacher and a 5-layer student"):
        layers_to_supervise(5, 12)
    with pytest.raises(DistillError, match="more layers"):
        layers_to_supervise(7, 6)


# ---------------------------------------------------------------------------------------------
# Tiny teachers
# ---------------------------------------------------------------------------------------------

V = 100  # vocabulary size of every tiny teacher

BART_KW = dict(
    vocab_size=V, d_model=32, encoder_layers=6, decoder_layers=6, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
)

SEQ2SEQ = {
    "bart": lambda: BartConfig(**BART_KW),
    "mbart": lambda: MBartConfig(**BART_KW),
    "pegasus": lambda: PegasusConfig(**{**BART_KW, "decoder_start_token_id": 1}),
    "marian": lambda: MarianConfig(**{**BART_KW, "decoder_start_token_id": 1}),
    "t5": lambda: T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=6, num_heads=4,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
    "mt5": lambda: MT5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=4,
                             num_decoder_layers=6, num_heads=4, decoder_start_token_id=0,
                             pad_token_id=0, eos_token_id=1),
    "umt5": lambda: UMT5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=4,
                               num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
}

LLAMA_KW = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CAUSAL = {
    "llama": lambda: LlamaConfig(**LLAMA_KW),
    "qwen2": lambda: Qwen2Config(**LLAMA_KW, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**{**LLAMA_KW, "head_dim": 16}, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**{**LLAMA_KW, "num_key_value_heads": 1}),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=6, n_head=4, n_positions=64),
}


BERT_KW = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
               max_position_embeddings=66, pad_token_id=1)

ENCODERS = {
    "bert": lambda: BertConfig(**BERT_KW),
    "roberta": lambda: RobertaConfig(**BERT_KW),
    "xlm-roberta": lambda: XLMRobertaConfig(**BERT_KW),
    "modernbert": lambda: ModernBertConfig(**{**BERT_KW, "global_attn_every_n_layers": 2}, bos_token_id=0,
                                           eos_token_id=2, cls_token_id=0, sep_token_id=2),
}


def save_teacher(path, config, seed=0):
    torch.manual_seed(seed)
    model = auto_class(config).from_config(config).eval()
    model.save_pretrained(path)
    return model


def save_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(V - 4)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(path)


def reload_and_forward(path):
    """Every student directory must reload with from_pretrained and run a forward pass."""
    config = AutoConfig.from_pretrained(path)
    model = auto_class(config).from_pretrained(path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 2]])
    kwargs = {"decoder_input_ids": torch.tensor([[2, 5, 6]])} if config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    assert out.logits.shape[-1] == config.vocab_size
    assert torch.isfinite(out.logits).all()
    return model


def assert_copied(teacher, student, layer_map):
    """Kept layers equal the teacher's mapped layers tensor by tensor; everything else equal."""
    t_stacks, s_stacks = layer_stacks(teacher), layer_stacks(student)
    assert set(s_stacks) == set(layer_map) == set(t_stacks)
    for name, (prefix, s_layers) in s_stacks.items():
        assert t_stacks[name][0] == prefix
        assert len(s_layers) == len(layer_map[name])
        for i, j in enumerate(layer_map[name]):
            s_sd, t_sd = s_layers[i].state_dict(), t_stacks[name][1][j].state_dict()
            assert s_sd.keys() == t_sd.keys()
            for k in s_sd:
                assert torch.equal(s_sd[k], t_sd[k]), f"{name} layer {i} <- {j}: {k}"
    prefixes = tuple(prefix + "." for prefix, _ in s_stacks.values())
    t_sd = teacher.state_dict()
    outside = [k for k in student.state_dict() if not k.startswith(prefixes)]
    assert outside, "expected embeddings / norms / head outside the layer stacks"
    for k in outside:
        assert torch.equal(student.state_dict()[k], t_sd[k]), k


def assert_tied_if_configured(model):
    if model.config.tie_word_embeddings:
        assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


# ---------------------------------------------------------------------------------------------
# make_student: layer copy
# ---------------------------------------------------------------------------------------------


def test_bart_6_6_to_6_3(tmp_path):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    teacher = save_teacher(teacher_dir, SEQ2SEQ["bart"]())
    save_tokenizer(teacher_dir)
    GenerationConfig(num_beams=3, max_length=20, decoder_start_token_id=2).save_pretrained(teacher_dir)

    info = make_student(str(teacher_dir), str(out), decoder_layers=3)
    assert info["layer_map"] == {"encoder": [0, 1, 2, 3, 4, 5], "decoder": [0, 2, 5]}
    assert info["mode"] == "layer_copy"
    assert info["student_params"] < info["teacher_params"]
    assert info["out_dir"] == str(out)
    text = format_layer_map(info)
    assert "decoder layer 1 <- teacher layer 2" in text.splitlines()
    assert "decoder layer 2 <- teacher layer 5" in text.splitlines()
    assert "encoder layer 5 <- teacher layer 5" in text.splitlines()

    student = reload_and_forward(out)
    assert student.config.encoder_layers == 6 and student.config.decoder_layers == 3
    assert student.config.distill_layer_map == info["layer_map"]
    assert student.config.distill_teacher == os.path.abspath(teacher_dir)
    assert_copied(teacher, student, info["layer_map"])
    # explicit spot check, independent of layer_stacks
    assert torch.equal(student.model.decoder.layers[1].fc1.weight, teacher.model.decoder.layers[2].fc1.weight)
    assert torch.equal(student.final_logits_bias, teacher.final_logits_bias)
    # tied embeddings stay tied after reload
    assert student.lm_head.weight.data_ptr() == student.model.shared.weight.data_ptr()
    assert student.model.encoder.embed_tokens.weight.data_ptr() == student.model.shared.weight.data_ptr()
    # tokenizer, generation config, safetensors
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert student.generation_config.num_beams == 3
    assert json.loads((out / "config.json").read_text())["distill_layer_map"]["decoder"] == [0, 2, 5]


def test_t5_6_to_2_keeps_block0_relative_bias(tmp_path):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    teacher = save_teacher(teacher_dir, SEQ2SEQ["t5"]())
    info = make_student(teacher_dir, out, encoder_layers=2, decoder_layers=2)
    assert info["layer_map"] == {"encoder": [0, 5], "decoder": [0, 5]}
    student = reload_and_forward(out)
    assert student.config.num_layers == 2 and student.config.num_decoder_layers == 2
    for stack in ("encoder", "decoder"):
        s_bias = getattr(student, stack).block[0].layer[0].SelfAttention.relative_attention_bias.weight
        t_bias = getattr(teacher, stack).block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert torch.equal(s_bias, t_bias)
    assert_copied(teacher, student, info["layer_map"])
    assert_tied_if_configured(student)


@pytest.mark.parametrize("family", ["pegasus", "marian", "mbart", "mt5", "umt5"])
def test_seq2seq_families_shrink(tmp_path, family):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    config = SEQ2SEQ[family]()
    teacher = save_teacher(teacher_dir, config)
    depths = stack_depths(config)
    info = make_student(teacher_dir, out, encoder_layers=2, decoder_layers=3)
    assert info["layer_map"]["encoder"] == layers_to_copy(2, depths["encoder"])
    assert info["layer_map"]["decoder"] == layers_to_copy(3, depths["decoder"])
    student = reload_and_forward(out)
    assert stack_depths(student.config) == {"encoder": 2, "decoder": 3}
    assert_copied(teacher, student, info["layer_map"])
    assert_tied_if_configured(student)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_decoder_only_shrink(tmp_path, family):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    config = CAUSAL[family]()
    teacher = save_teacher(teacher_dir, config)
    info = make_student(teacher_dir, out, decoder_layers=3)
    assert info["layer_map"] == {"decoder": [0, 2, 5]}
    student = reload_and_forward(out)
    assert stack_depths(student.config) == {"decoder": 3}
    assert_copied(teacher, student, info["layer_map"])
    assert_tied_if_configured(student)
    if family in ("qwen2", "qwen3"):
        assert len(student.config.layer_types) == 3
    if family == "llama":
        assert student.config.num_key_value_heads == 2 < student.config.num_attention_heads
        assert not student.config.tie_word_embeddings  # an untied head stays untied
        assert student.lm_head.weight.data_ptr() != student.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", list(ENCODERS))
def test_encoder_only_shrink(tmp_path, family):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    config = ENCODERS[family]()
    teacher = save_teacher(teacher_dir, config)
    info = make_student(teacher_dir, out, encoder_layers=3)
    assert info["layer_map"] == {"encoder": [0, 2, 5]}
    student = reload_and_forward(out)
    assert type(student).__name__.endswith("ForMaskedLM")
    assert stack_depths(student.config) == {"encoder": 3}
    assert_copied(teacher, student, info["layer_map"])
    assert_tied_if_configured(student)
    if family == "modernbert":  # full and sliding-window layers follow the layer map
        assert student.config.layer_types == [config.layer_types[j] for j in (0, 2, 5)]
    with pytest.raises(DistillError, match="is encoder-only: decoder_layers does not apply"):
        make_student(teacher_dir, tmp_path / "bad", decoder_layers=3)


@pytest.mark.parametrize("family", list(ENCODERS))
def test_width_student_encoder_only(tmp_path, family):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    save_teacher(teacher_dir, ENCODERS[family]())
    info = make_student(teacher_dir, out, encoder_layers=2, hidden_size=16, num_heads=2)
    assert info["mode"] == "width" and info["copied_tensors"] == 0
    student = reload_and_forward(out)
    cfg = student.config
    assert student.get_input_embeddings().weight.shape == (V, 16)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (2, 2, 32)


def test_keep_depth_and_dtype(tmp_path):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    teacher = save_teacher(teacher_dir, CAUSAL["llama"]())
    info = make_student(teacher_dir, out, dtype="bf16")
    assert info["layer_map"] == {"decoder": list(range(6))}
    assert info["student_params"] == info["teacher_params"]
    student = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(student.parameters()).dtype == torch.bfloat16
    assert torch.equal(student.lm_head.weight.float(), teacher.lm_head.weight.to(torch.bfloat16).float())


# ---------------------------------------------------------------------------------------------
# make_student: new width (MiniEnD style)
# ---------------------------------------------------------------------------------------------


def test_width_student_bart(tmp_path):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    save_teacher(teacher_dir, BartConfig(**{**BART_KW, "d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128}))
    save_tokenizer(teacher_dir)
    info = make_student(teacher_dir, out, encoder_layers=3, decoder_layers=3, hidden_size=32, num_heads=4)
    assert info["mode"] == "width" and info["layer_map"] is None and info["copied_tensors"] == 0
    assert "nothing copied" in info["init"]
    assert "nothing copied" in format_layer_map(info)
    student = reload_and_forward(out)
    cfg = student.config
    assert (cfg.d_model, cfg.encoder_attention_heads, cfg.decoder_attention_heads) == (32, 4, 4)
    assert (cfg.encoder_ffn_dim, cfg.decoder_ffn_dim) == (64, 64)  # teacher's 2x ratio kept
    assert (cfg.encoder_layers, cfg.decoder_layers) == (3, 3)
    assert cfg.vocab_size == V and student.get_input_embeddings().weight.shape == (V, 32)
    assert (cfg.pad_token_id, cfg.decoder_start_token_id, cfg.eos_token_id) == (1, 2, 2)
    assert getattr(cfg, "distill_layer_map", None) is None
    assert (out / "tokenizer.json").exists()


@pytest.mark.parametrize("family", ["t5", "llama", "gpt2"])
def test_width_student_other_families(tmp_path, family):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    config = (SEQ2SEQ | CAUSAL)[family]()
    save_teacher(teacher_dir, config)
    make_student(teacher_dir, out, decoder_layers=2, hidden_size=16, num_heads=2, ffn_size=24)
    student = reload_and_forward(out)
    cfg = student.config
    assert student.get_input_embeddings().weight.shape == (V, 16)
    assert stack_depths(cfg)["decoder"] == 2
    if family == "t5":
        assert (cfg.d_kv, cfg.d_ff, cfg.num_heads) == (8, 24, 2)
    if family == "llama":  # teacher has 2 query heads per kv head
        assert (cfg.head_dim, cfg.num_key_value_heads, cfg.intermediate_size) == (8, 1, 24)


# ---------------------------------------------------------------------------------------------
# layer_stacks
# ---------------------------------------------------------------------------------------------


def test_layer_stacks_prefixes_and_wrappers():
    from transformers import BartModel, LlamaModel

    cases = [
        (AutoModelForSeq2SeqLM.from_config(SEQ2SEQ["bart"]()), {"encoder": "model.encoder.layers", "decoder": "model.decoder.layers"}),
        (AutoModelForSeq2SeqLM.from_config(SEQ2SEQ["t5"]()), {"encoder": "encoder.block", "decoder": "decoder.block"}),
        (AutoModelForCausalLM.from_config(CAUSAL["qwen2"]()), {"decoder": "model.layers"}),
        (AutoModelForCausalLM.from_config(CAUSAL["gpt2"]()), {"decoder": "transformer.h"}),
        (BartModel(SEQ2SEQ["bart"]()), {"encoder": "encoder.layers", "decoder": "decoder.layers"}),
        (LlamaModel(CAUSAL["llama"]()), {"decoder": "layers"}),
    ]
    for model, expected in cases:
        stacks = layer_stacks(model)
        assert {k: p for k, (p, _) in stacks.items()} == expected
        modules = dict(model.named_modules())
        for prefix, layers in stacks.values():
            assert modules[prefix] is layers and len(layers) == 6

    class Wrapper(torch.nn.Module):  # DeepSpeed engine / DDP style
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(cases[2][0])
    prefix, layers = layer_stacks(wrapped)["decoder"]
    assert prefix == "module.model.layers" and dict(wrapped.named_modules())[prefix] is layers


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    save_teacher(root / "bart", SEQ2SEQ["bart"]())
    save_teacher(root / "llama", CAUSAL["llama"]())
    return root


def test_errors(tmp_path, tiny_teachers):
    bart, llama, out = str(tiny_teachers / "bart"), str(tiny_teachers / "llama"), str(tmp_path / "s")
    missing = str(tmp_path / "no-such-teacher")
    with pytest.raises(DistillError, match=f"teacher not found: {missing}"):
        make_student(missing, out, decoder_layers=1)
    with pytest.raises(DistillError, match="decoder_layers=7 is more than the teacher's 6"):
        make_student(bart, out, decoder_layers=7)
    with pytest.raises(DistillError, match="encoder_layers must be a positive integer, got 0"):
        make_student(bart, out, encoder_layers=0)
    with pytest.raises(DistillError, match="hidden size 30 is not divisible by 4 attention heads"):
        make_student(bart, out, hidden_size=30, num_heads=4)
    with pytest.raises(DistillError, match="hidden size 32 is not divisible by 3"):
        make_student(llama, out, num_heads=3)
    with pytest.raises(DistillError, match="decoder-only"):
        make_student(llama, out, encoder_layers=2)
    with pytest.raises(DistillError, match="unknown dtype"):
        make_student(llama, out, dtype="int3")
    with pytest.raises(DistillError, match="must differ"):
        make_student(bart, bart, decoder_layers=2)
    assert not os.path.exists(out)
