"""
README.md: the facts it states about the code itself stay true as the code changes (the line counts of the pitch).

    python -m pytest tests/test_readme.py
"""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()

def line_counts():
    counts = {}
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        with open(path, encoding="utf-8") as f:
            counts[os.path.basename(path)] = sum(1 for _ in f)
    return counts

def test_readme_line_counts_are_the_files():
    line = next(l for l in readme().splitlines() if l.startswith("Lines: "))
    stated = {name: int(n) for name, n in re.findall(r"(\w+\.py) (\d+)", line)}
    actual = line_counts()
    assert stated == actual, f"README's 'Lines:' line says {stated}, the files have {actual}"
    total = int(re.search(r"\(([\d,]+) in all\)", line).group(1).replace(",", ""))
    assert total == sum(actual.values())

def test_readme_pitch_rounds_the_total():
    about = int(re.search(r"about ([\d,]+) lines in all", readme()).group(1).replace(",", ""))
    assert abs(about - sum(line_counts().values())) <= 50, "the pitch's 'about N lines' is more than 50 off; round the total again"
