"""Each eval suite's data and scoring, without any model: answer extraction, the sandbox, the checkers, the judge
verdict parsers."""

from __future__ import annotations

import pytest

from moa_local.eval import get_suite
from moa_local.eval.base import Item
from moa_local.eval.humaneval import build_check, extract_code
from moa_local.eval.math import extract_final_answer, is_correct
from moa_local.eval.mtbench import parse_rating
from moa_local.eval.sandbox import run_check


def test_suites_load_their_full_offline_data_sets() -> None:
    sizes = {"ifeval": 541, "humaneval": 164, "mtbench": 80, "alpacaeval": 805}
    for name, size in sizes.items():
        items = get_suite(name).items()
        assert len(items) == size, name
        assert len({it.id for it in items}) == size, f"{name}: ids must be unique"
    assert all(len(it.turns) == 2 for it in get_suite("mtbench").items())
    assert len(get_suite("math").items(200)) == 200
    assert len(get_suite("ifeval").items(3)) == 3


def test_math_items_are_deterministic_and_interleave_both_generators() -> None:
    a, b = get_suite("math").items(6), get_suite("math").items(6)
    assert [(x.id, x.turns, x.data) for x in a] == [(x.id, x.turns, x.data) for x in b]
    assert [x.data["kind"] for x in a] == ["gsm_symbolic", "basic_arithmetic"] * 3
    assert get_suite("math", seed=1).items(2)[0].turns != a[0].turns


@pytest.mark.parametrize(("text", "final"), [
    ("First 12 + 5 = 17 students. Then 17 * 2 = 34.\nAnswer: 34", "34"),
    ("<answer>1,250</answer> and later 7", "1,250"),
    ("so the result is \\boxed{-3}.", "-3"),
    ("12 apples and 30 pears\n#### 42", "42"),
    ("The answer is 7 apples, not 9", "7"),
    ("We get 3 then 4 then 5.", "5"),
    ("no numbers here", None),
])
def test_final_answer_is_extracted_not_the_first_number(text: str, final: str | None) -> None:
    assert extract_final_answer(text) == final


def test_exact_numeric_comparison() -> None:
    assert is_correct("1,250", "1250") and is_correct("-3.0", "-3") and is_correct("$70", "70")
    assert not is_correct("71", "70") and not is_correct(None, "70") and not is_correct("", "70")


def test_math_score_is_binary_on_the_final_answer() -> None:
    suite = get_suite("math")
    item = suite.items(1)[0]
    right = f"Step one: {int(item.data['answer']) + 1} is wrong. Answer: {item.data['answer']}"
    assert suite.score(item, [right], []).value == 1.0
    assert suite.score(item, [f"Answer: {item.data['answer']}1"], []).value == 0.0
    assert suite.score(item, [None], []).value == 0.0


def test_code_is_taken_from_the_fence_that_defines_the_function() -> None:
    text = "Here:\n```\nprint('hi')\n```\nand\n```python\ndef f(x):\n    return x + 1\n```\nDone."
    assert extract_code(text, "f").strip() == "def f(x):\n    return x + 1"
    assert "return 2" in extract_code("```python\ndef g():\n    return 2\n", "g"), "an unclosed fence still counts"
    assert extract_code("def f(): pass", "f") == "def f(): pass"


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail_in_a_subprocess() -> None:
    suite = get_suite("humaneval")
    items = suite.items(4)
    fenced = [(it, [f"```python\n{it.data['prompt']}{it.data['canonical_solution']}```"]) for it in items]
    body_only = [(it, [it.data["canonical_solution"]]) for it in items]
    wrong = [(it, [f"```python\ndef {it.data['entry_point']}(*args):\n    return None\n```"]) for it in items]
    assert [s.value for s in suite.score_many(fenced)] == [1.0] * 4
    assert [s.value for s in suite.score_many(body_only)] == [1.0] * 4
    scored = suite.score_many(wrong)
    assert [s.value for s in scored] == [0.0] * 4 and all(s.details["status"] == "failed" for s in scored)


def test_program_keeps_the_prompt_helpers() -> None:
    problem = {"prompt": "import math\n\ndef helper():\n    return 1\n\ndef f(x):\n    \"\"\"doc\"\"\"\n",
               "entry_point": "f", "test": "def check(c):\n    assert c(1) == 2\n"}
    assert run_check(build_check(problem, "```python\ndef f(x):\n    return x + helper()\n```")).passed
    assert run_check(build_check(problem, "    return x + helper()\n")).passed
    assert not run_check(build_check(problem, "    return x\n")).passed


def test_ifeval_checkers_work_offline_and_are_repeatable(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MOA_LOCAL_HOME", str(tmp_path))
    suite = get_suite("ifeval")
    items = {it.id: it for it in suite.items()}
    no_comma = items["1001"]  # "You are not allowed to use any commas"
    assert suite.score(no_comma, ["Good morrow to thee and all thy kin"], []).value == 1.0
    assert suite.score(no_comma, ["Good morrow, to thee"], []).value == 0.0
    assert suite.score(no_comma, [None], []).value == 0.0, "a failed answer follows nothing"
    assert (tmp_path / "nltk_data/tokenizers/punkt_tab/english/ortho_context.tab").is_file()
    # An item whose checker counts sentences needs the trained punkt tokenizer; verdicts repeat exactly.
    sentence_items = [it for it in items.values()
                      if any(i.startswith("length_constraints:number_sentences") for i in it.data["instruction_id_list"])]
    assert sentence_items
    text = "Mr. Smith arrived at 5 p.m. yesterday. He was late. Dr. Who was not."
    first = [suite.check(it, text) for it in sentence_items[:5]]
    assert first == [suite.check(it, text) for it in sentence_items[:5]]
    details = suite.score(no_comma, ["a b"], []).details
    assert set(details) >= {"strict", "loose", "instruction_ids"}


def test_ifeval_summary_has_the_four_standard_accuracies() -> None:
    suite = get_suite("ifeval")
    recs = [{"details": {"strict": [True, False], "loose": [True, True]}},
            {"details": {"strict": [True], "loose": [True]}}]
    assert suite.summary(recs) == {"prompt-level strict": 0.5, "prompt-level loose": 1.0,
                                   "instruction-level strict": 2 / 3, "instruction-level loose": 1.0}


@pytest.mark.parametrize(("text", "rating"), [
    ("Good answer. Rating: [[8]]", 8.0), ("[[7.5]]", 7.5), ("score [6] overall", 6.0), ("Rating: 3", 3.0),
    ("Rating: [[11]]", None), ("no verdict", None), (None, None),
])
def test_mtbench_rating_parser(text: str | None, rating: float | None) -> None:
    assert parse_rating(text) == rating


def test_mtbench_uses_reference_prompts_for_math_and_the_multi_turn_prompt_for_turn_two() -> None:
    suite = get_suite("mtbench")
    items = {it.data["category"]: it for it in suite.items()}
    writing, math = items["writing"], items["math"]
    p = suite.judge_prompts(writing, ["a1", "a2"], reference=None)
    assert len(p) == 2 and "[[rating]]" in p[0][1]["content"] and "Reference" not in p[0][1]["content"]
    assert "second user question" in p[1][0]["content"] and "a2" in p[1][1]["content"]
    m = suite.judge_prompts(math, ["a1", "a2"], reference=None)
    assert math.data["reference"] and math.data["reference"][0] in m[0][1]["content"]
    assert suite.judge_prompts(writing, [None, None], reference=None) == []
    assert suite.messages(writing, 1, ["first answer"])[1] == {"role": "assistant", "content": "first answer"}
    s = suite.score(writing, ["a1", "a2"], ["[[8]]", "[[4]]"])
    assert s.value == 6.0 and s.details["ratings"] == [8.0, 4.0]
    assert suite.score(writing, ["a1", "a2"], ["x", "[[4]]"]).value == 4.0
    assert suite.score(writing, ["a1", None], ["[[9]]"]).value == 9.0


def test_alpacaeval_swaps_positions_and_scores_from_the_system_side() -> None:
    suite = get_suite("alpacaeval")
    item = suite.items(1)[0]
    games = suite.judge_prompts(item, ["SYSTEM ANSWER"], reference="REF ANSWER")
    first, second = (g[1]["content"] for g in games)
    assert first.index("REF ANSWER") < first.index("SYSTEM ANSWER")
    assert second.index("SYSTEM ANSWER") < second.index("REF ANSWER")
    assert suite.score(item, ["x"], ["M", "m"]).value == 1.0, "system preferred in both positions"
    assert suite.score(item, ["x"], ["m", "M"]).value == 0.0
    assert suite.score(item, ["x"], ["m", "m"]).value == 0.5, "a position-biased judge gives a draw"
    assert suite.score(item, ["x"], ["???", "???"]).value is None
    assert suite.judge_prompts(item, [None], reference="REF") == []


def test_unknown_suite_names_the_valid_ones() -> None:
    from moa_local.errors import InputError

    with pytest.raises(InputError, match="ifeval, humaneval, mtbench, alpacaeval, math"):
        get_suite("mmlu")


def test_item_is_plain_data() -> None:
    assert Item("a", ["q"]).data == {}
