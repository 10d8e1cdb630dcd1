"""Golden tests: exact rendered prompts and exact parses of run-on base-model text."""

from stage1_core.phases import prompts
from stage1_core.infra.config import Rubric, WorkedExample, load_pilot_config


def test_instruction_prompt_golden():
    p = prompts.build_instruction_prompt("Tasks:\n\n", ["Add 2 and 3.", "Name a fruit."])
    assert p == "Tasks:\n\n1. Add 2 and 3.\n2. Name a fruit.\n3."


def test_default_instruction_prompt_golden():
    cfg = load_pilot_config()
    p = prompts.build_instruction_prompt(cfg.instruction_generation.header, ["A.", "B."])
    assert p == ("Below is a list of diverse tasks that a person might ask an assistant to do.\n\n"
                 "1. A.\n2. B.\n3.")


def test_parse_list_stops_at_list_end():
    run_on = (" Write a haiku about rain.\n4. Explain gravity to a child.\n5. List two uses of salt.\n\n"
              "These tasks are great for practice.\n6. Not part of the list")
    assert prompts.parse_instruction_list(run_on, 3, truncated=False) == [
        "Write a haiku about rain.", "Explain gravity to a child.", "List two uses of salt."]


def test_parse_list_stops_at_wrong_number_and_drops_truncated_tail():
    assert prompts.parse_instruction_list(" One.\n5. Skipped a number", 3, truncated=False) == ["One."]
    assert prompts.parse_instruction_list(" One.\n4. Two.\n5. Cut mid", 3, truncated=True) == ["One.", "Two."]
    assert prompts.parse_instruction_list(" One.\n4. Two.\n5. Whole.", 3, truncated=False) == ["One.", "Two.", "Whole."]


def test_parse_list_accepts_paren_numbering_and_skips_empty():
    assert prompts.parse_instruction_list(" First.\n4)   \n5) Third.", 3, truncated=False) == ["First.", "Third."]


def test_response_prompt_golden():
    ex = [WorkedExample(instruction="Q1?", response="A1."), WorkedExample(instruction="Q2?", response="A2.")]
    assert prompts.build_response_prompt("Do X.", ex) == (
        "Instruction: Q1?\nResponse: A1.\n\nInstruction: Q2?\nResponse: A2.\n\nInstruction: Do X.\nResponse:")


def test_default_response_prompt_has_two_worked_examples():
    cfg = load_pilot_config()
    rg = cfg.response_generation
    p = prompts.build_response_prompt("Name a colour.", rg.worked_examples[: rg.n_examples])
    assert p.count("Instruction:") == 3 and p.endswith("Instruction: Name a colour.\nResponse:")
    assert p.startswith("Instruction: Give three tips for staying healthy.\nResponse: Eat a balanced diet")


def test_clean_response_cuts_at_first_delimiter():
    assert prompts.clean_response(" Paris.\n\nInstruction: next") == "Paris."
    assert prompts.clean_response(" Paris.\nInstruction: Name a city.\nResponse: Rome.") == "Paris."
    assert prompts.clean_response(" Line one\nline two\nResponse: x") == "Line one\nline two"
    assert prompts.clean_response("   \n\n") == ""
    assert prompts.clean_response(" A ### B", ["###"]) == "A"


def test_critic_prompt_golden_and_swap():
    r = Rubric(template="Q\nA) {option_a}\nB) {option_b}\nText: {instruction}\nAnswer:", good_option="good", bad_option="bad")
    assert prompts.build_critic_prompt(r, swap=False, instruction="X {y}") == "Q\nA) good\nB) bad\nText: X {y}\nAnswer:"
    assert prompts.build_critic_prompt(r, swap=True, instruction="X") == "Q\nA) bad\nB) good\nText: X\nAnswer:"
    r2 = r.model_copy(update={"template": "Q\n{label_a}) {option_a}\n{label_b}) {option_b}\nText: {instruction}\nAnswer:"})
    assert prompts.build_critic_prompt(r2, swap=False, instruction="X", labels=("Y", "N")) == "Q\nY) good\nN) bad\nText: X\nAnswer:"


def test_default_pair_rubric_golden():
    """The shipped few-shot Yes/No pair rubric, rendered exactly, in both example orders."""
    cfg = load_pilot_config()
    shots = [("What is the capital of Italy?", "The capital of Italy is Rome.", "Yes"),
             ("What is the capital of Italy?", "The capital of Italy is Madrid.", "No"),
             ("Give one tip for studying.", "I have a red bicycle.", "No"),
             ("Translate 'cat' into Spanish.", "Gato.", "Yes"),
             ("List two sources of protein.", "Eggs and", "No"),
             ("How many days are in a week?", "There are seven days in a week.", "Yes"),
             ("Name an animal that lives in the sea.", "A dolphin.", "Yes"),
             ("How many days are in a week?", "There are five days in a week.", "No")]
    rub = cfg.critic.pair_rubric
    assert rub.labels == ("Yes", "No") and rub.label_swap is False and rub.order_swap is False
    head = "Does the response correctly and completely answer the instruction? Answer Yes or No.\n\n"
    tail = "Instruction: I?\nResponse: R.\nAnswer:"
    body = "".join(f"Instruction: {i}\nResponse: {r}\nAnswer: {a}\n\n" for i, r, a in shots)
    p = prompts.build_critic_prompt(rub, swap=False, instruction="I?", response="R.", labels=rub.labels)
    assert p == head + body + tail
    rev = "".join(f"Instruction: {i}\nResponse: {r}\nAnswer: {a}\n\n" for i, r, a in reversed(shots))
    assert prompts.build_critic_prompt(rub, swap=False, reverse=True, instruction="I?", response="R.",
                                       labels=rub.labels) == head + rev + tail
    # swapped: the question asks whether the response is bad, so "Yes" now means bad
    swapped = prompts.build_critic_prompt(rub, swap=True, instruction="I?", response="R.", labels=rub.labels)
    assert swapped.startswith("Is the response wrong, off-topic, cut off, or repetitive? Answer Yes or No.\n\n"
                              "Instruction: What is the capital of Italy?\nResponse: The capital of Italy is Rome.\n"
                              "Answer: No\n\n")
