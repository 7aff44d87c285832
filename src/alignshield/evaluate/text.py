"""Text hygiene shared by generation and judges (no heavy imports)."""

from __future__ import annotations


def clean_text(text: str | None) -> str:
    """Text every tokenizer accepts and every JSON writer can encode: None becomes "", and lone
    surrogates (possible after ``\\ud800``-style JSON escapes) become U+FFFD."""
    if text is None:
        return ""
    text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")


def is_empty(answer: str | None) -> bool:
    """An answer with no visible character (``answers/empty`` counts these)."""
    return not clean_text(answer).strip()
