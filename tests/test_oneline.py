"""One-line messages: whitespace collapsed, a long one cut in the middle."""

from jupyterhub_condaspawner.oneline import one_line


def test_short_text_is_only_collapsed():
    assert one_line("build failed:\n  pip\texited 1 ", 400) == "build failed: pip exited 1"


def test_long_text_keeps_its_beginning_and_its_end():
    text = "Your environment cannot be solved: " + " ".join(f"step{i}" for i in range(500)) + \
        " cs-alpha 1.1 conflicts; check your environment.yml"
    line = one_line(text, 400)
    assert len(line) == 400
    assert line.startswith("Your environment cannot be solved: step0 step1")
    assert " [...] " in line
    assert line.endswith("cs-alpha 1.1 conflicts; check your environment.yml")
