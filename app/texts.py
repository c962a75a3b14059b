"""Texts secateurs knows by their bytes, so that a summary can say what a text *is*, not only where it lay.

A perplexity means something only with its text. Reports record the text's source (a file path, or a dataset
as ``name/config:split``) and the sha256 of its exact bytes; this table turns a known sha256 into words. A file
is never called WikiText-2 because of its name or where it was found: only its bytes decide.
"""

from __future__ import annotations

WIKITEXT2_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
"""``wiki.test.raw`` as this project's shared data holds it (CRLF line ends, empty rows dropped)."""
EXLLAMAV2_WIKI_SHA256 = "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"
EXLLAMAV2_C4_SHA256 = "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505"

KNOWN_TEXTS: dict[str, str] = {
    WIKITEXT2_TEST_SHA256: "the WikiText-2 raw test split, as a file with CRLF line ends and its empty rows dropped",
    EXLLAMAV2_WIKI_SHA256: "exllamav2 0.3.2's wiki.utf8: Wikipedia articles, NOT WikiText-2",
    EXLLAMAV2_C4_SHA256: "exllamav2 0.3.2's c4.utf8: C4 web text",
}


def describe_text(source: str | None, sha256: str | None) -> str:
    """The source as recorded, and what its bytes are when the sha256 is a known one."""
    if source is None:
        return "none"
    known = KNOWN_TEXTS.get(sha256 or "")
    return f"{source} ({known})" if known else source
