"""FISH-DIP in the training loops and PEFT / Transformers paths its users take (the README's table)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer

from fishdip_peft import FishDipConfig
from tests.models import causal_batch, seq2seq_batch, tiny_llama, tiny_t5, train_automatically
from tests.test_trainer import RowDataset, one_thread, training_args  # noqa: F401 (fixture)

CONFIG = dict(density=0.05, update_every=2, num_regressing=3)


def eligible(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().clone() for _, p in model.base_model.eligible_parameters()])


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_plain_trainer_trains_without_any_step_call(tmp_path):
    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    before = eligible(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, steps=5), train_dataset=RowDataset())
    trainer.train()
    tuner = model.base_model
    assert tuner.step_count == 5 and tuner.refresh_count == 3  # the first mask, then at steps 2 and 4
    grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert all(g > 0 for g in grad_norms)
    changed = eligible(model) != before
    assert changed.any()
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    batch = causal_batch(7)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_plain_seq2seq_trainer_trains_t5(tmp_path):
    model = get_peft_model(tiny_t5(), FishDipConfig(**CONFIG))
    args = training_args(tmp_path, steps=3, args_class=Seq2SeqTrainingArguments)
    Seq2SeqTrainer(model=model, args=args, train_dataset=RowDataset(24, seq2seq_batch)).train()
    assert model.base_model.step_count == 3 and model.base_model.refresh_count == 2


def test_trl_sft_trainer_with_a_fishdip_config(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tests.models import word_tokenizer_and_texts

    tokenizer, texts = word_tokenizer_and_texts()
    config = SFTConfig(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                       use_cpu=True, logging_steps=1, save_strategy="no", max_length=16, disable_tqdm=True)
    trainer = SFTTrainer(model=tiny_llama(), args=config, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tokenizer, peft_config=FishDipConfig(**CONFIG))
    before = eligible(trainer.model)
    trainer.train()
    tuner = trainer.model.base_model
    assert tuner.step_count == 4 and tuner.refresh_count == 2
    assert (eligible(trainer.model) != before).any()


def test_accelerate_custom_loop_with_plain_prepare():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for step in range(3):
        loss = model(**causal_batch(step)).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    tuner = accelerator.unwrap_model(model).base_model
    assert tuner.step_count == 3 and tuner.refresh_count == 2


def _train_steps(model, steps, compiled=None):
    train_automatically(model, steps, runner=compiled)


def test_torch_compile_trains_like_eager_across_a_refresh():
    eager = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    _train_steps(eager, 3)
    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    _train_steps(model, 3, torch.compile(model, backend="aot_eager"))
    assert model.base_model.refresh_count == eager.base_model.refresh_count == 2
    assert torch.equal(model.base_model.mask, eager.base_model.mask)
    torch.testing.assert_close(eligible(model), eligible(eager), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_in_a_custom_loop(reentrant):
    plain = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    _train_steps(plain, 3)
    base = tiny_llama()
    base.enable_input_require_grads()  # before wrapping, as some recipes do: the embedding output is a leaf
    model = get_peft_model(base, FishDipConfig(**CONFIG))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    _train_steps(model, 3)
    assert torch.equal(model.base_model.mask, plain.base_model.mask)
    torch.testing.assert_close(eligible(model), eligible(plain), rtol=1e-6, atol=1e-6)


def test_bfloat16_cast_after_training_keeps_every_path_working(tmp_path):
    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    _train_steps(model, 3)
    model.eval()
    model.to(torch.bfloat16)
    assert model.base_model.fishdip_state.values.dtype == torch.float32
    batch = causal_batch(9)
    reference = logits(tiny_llama().to(torch.bfloat16), batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), reference)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path)
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    assert torch.equal(logits(model.unload(), batch), reference)


def test_transformers_adapter_mixin_and_inject_adapter_in_model_refuse_and_change_nothing(tmp_path):
    from peft import inject_adapter_in_model

    trained = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    _train_steps(trained, 2)
    trained.save_pretrained(tmp_path)
    for attempt in (lambda m: m.load_adapter(str(tmp_path)), lambda m: m.add_adapter(FishDipConfig(**CONFIG)),
                    lambda m: inject_adapter_in_model(FishDipConfig(**CONFIG), m)):
        model = tiny_llama()
        before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        with pytest.raises(ValueError, match="shared state.*get_peft_model"):
            attempt(model)
        assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
                   for n, p in model.named_parameters())
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
        assert not hasattr(model, "peft_config")


def test_trainable_reload_resumes_with_its_mask(tmp_path):
    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    _train_steps(model, 3)
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert torch.equal(resumed.base_model.mask, model.base_model.mask)
    torch.testing.assert_close(resumed.base_model.fishdip_state.values, model.base_model.fishdip_state.values)
    assert resumed.base_model.fishdip_state.values.requires_grad


def test_set_peft_model_state_dict_twice_changes_nothing_the_second_time(tmp_path):
    from safetensors.torch import load_file

    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    _train_steps(model, 2)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    fresh = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    set_peft_model_state_dict(fresh, state)
    once = [p.detach().clone() for p in fresh.parameters()]
    with pytest.warns(UserWarning, match="already holds deltas"):
        set_peft_model_state_dict(fresh, state)
    assert all(torch.equal(a, b) for a, b in zip(once, fresh.parameters()))
    batch = causal_batch(4)
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_sequence_classification_per_sample_losses_in_automatic_mode():
    from tests.models import tiny_bert_classifier

    model = get_peft_model(tiny_bert_classifier(), FishDipConfig(task_type="SEQ_CLS", **CONFIG))
    batch = {"input_ids": torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1, 2, 1])}
    model.train()
    model(**batch)
    assert model.base_model.pool_losses() == []  # the first mask used and drained them
    assert model.base_model.refresh_count == 1
    outputs = model(**batch)
    expected = torch.nn.functional.cross_entropy(outputs.logits.detach(), batch["labels"], reduction="none")
    assert sorted(model.base_model.pool_losses(), reverse=True) == pytest.approx(
        sorted(expected.tolist(), reverse=True)[:3], rel=1e-5)


def test_importing_fishdip_leaves_other_methods_saves_byte_identical(tmp_path):
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "sys.path.insert(0, '.')\n"
        "if sys.argv[2] == 'import': import fishdip_peft\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from tests.models import tiny_llama\n"
        "torch.manual_seed(0)\n"
        "m = get_peft_model(tiny_llama(), LoraConfig(target_modules=['q_proj'], init_lora_weights=False))\n"
        "m.save_pretrained(sys.argv[1])\n"
    )
    for mode in ("plain", "import"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / mode), mode], check=True, cwd=".")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "import" / name).read_bytes()
    import peft.peft_model

    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    writer = peft.peft_model.safe_save_file
    model.save_pretrained(tmp_path / "fishdip")
    assert peft.peft_model.safe_save_file is writer  # nothing stays patched after a FISH-DIP save


def test_optimizer_hooks_go_away_with_their_model():
    import gc

    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    gc.collect()  # models of earlier tests take their hooks with them
    counts = len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)
    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    assert len(_global_optimizer_post_hooks) == counts[1] + 1
    del model
    gc.collect()
    assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == counts
