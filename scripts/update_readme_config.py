"""Regenerate the README's config reference from the config classes: python scripts/update_readme_config.py"""

from pathlib import Path

from decode_accel.training.config import config_reference_markdown

START, END = "<!-- CONFIG REFERENCE START -->", "<!-- CONFIG REFERENCE END -->"


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_reference_markdown().strip()}\n{END}{tail}"


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "README.md"
    path.write_text(render(path.read_text()))
    print(f"updated {path}")
