"""The engine: the template's EOS comes from the model, and answer_prompts keeps the input order."""

import types as pytypes

from uniner import engine


def test_template_eos_comes_from_the_tokenizer(tokenizer):
    assert engine.template_for(pytypes.SimpleNamespace(eos_token="</s>")).eos == "</s>"
    assert engine.template_for(tokenizer).eos == tokenizer.eos_token == "<|im_end|>"
    assert engine.template_for(tokenizer).query("Some text.", "person").endswith("in the text? ASSISTANT:")


def test_answer_prompts_keeps_input_order(ray_session, builtin_model_dir):
    things = ["cats", "the sea", "Paris", "winter", "music", "bread", "the moon", "trains", "coffee", "rain", "chess"]
    prompts = [
        f"USER: Write one sentence about {thing}. ASSISTANT:" + " Sure." * (i % 3) for i, thing in enumerate(things)
    ]
    kwargs = {"model": str(builtin_model_dir), "backend": "transformers", "max_new_tokens": 6}
    batched = engine.answer_prompts(prompts, batch_size=3, replicas=2, **kwargs)
    one_by_one = engine.answer_prompts(prompts[::-1], batch_size=1, **kwargs)[::-1]
    assert len(batched) == len(prompts) and len(set(batched)) > 5
    assert batched == one_by_one
    assert engine.answer_prompts([], **kwargs) == []
