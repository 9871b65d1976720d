from moa_local.prompts import format_references, inject_references, prompt_text, render_prompt


def test_layer_one_messages_are_unchanged_without_references() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert inject_references(msgs, []) == msgs


def test_references_go_into_a_new_system_message() -> None:
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    out = inject_references(msgs, ["four", "4"])
    assert out[0]["role"] == "system"
    assert "1. four" in out[0]["content"] and "2. 4" in out[0]["content"]
    assert out[1] == msgs[0]
    assert msgs == [{"role": "user", "content": "What is 2+2?"}], "input must not be mutated"


def test_existing_system_message_is_kept_and_extended() -> None:
    msgs = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    out = inject_references(msgs, ["ref"], system_prompt="Role prompt.")
    assert len(out) == 4
    assert out[0]["content"].startswith("Be terse.\n\nRole prompt.\n\n")
    assert "1. ref" in out[0]["content"]
    assert out[1:] == msgs[1:]


def test_aggregate_prompt_is_package_data_with_a_placeholder() -> None:
    text = prompt_text("aggregate")
    assert "{references}" in text
    assert format_references(["  x  ", "y"]) == "1. x\n2. y"


def test_transcript_format_for_base_models() -> None:
    r = render_prompt(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], prompt_format="transcript"
    )
    assert r.text == "S\n\nUser: Q\n\nAssistant:"
    assert "\nUser:" in r.stop and r.add_special_tokens


def test_vicuna_format() -> None:
    r = render_prompt(
        [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
        prompt_format="vicuna",
    )
    assert r.text.endswith("USER: Q1 ASSISTANT: A1</s> USER: Q2 ASSISTANT:")
    assert r.text.startswith("A chat between")


class _Tok:
    def apply_chat_template(self, conversation, **kwargs):  # type: ignore[no-untyped-def]
        assert kwargs == {"tokenize": False, "add_generation_prompt": True}
        return "|".join(m["content"] for m in conversation) + "|>"


def test_chat_template_uses_the_tokenizer() -> None:
    r = render_prompt([{"role": "user", "content": "Q"}], prompt_format="chat_template", tokenizer=_Tok())
    assert r.text == "Q|>" and not r.add_special_tokens
