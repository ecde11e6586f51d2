#!/usr/bin/env python3
"""Brazilian Portuguese text for `triagem pretrain`, from Debian packages.

Installs the packages when missing (apt), extracts running text from each
(HTML help pages, man pages, fortunes), one paragraph per line, drops
duplicates, code-like lines and lines of fewer than 4 words, and writes

    OUT/corpus.txt      the paragraphs, sources interleaved in a fixed order
    OUT/SOURCES.md      package, version, licence and paragraph count of each source

Only the Python standard library. The result depends only on the package
versions: the same packages give the same file byte for byte.

    scripts/pretrain-corpus.py [OUT]        (default: target/corpus)
"""

import gzip
import hashlib
import html.parser
import os
import re
import subprocess
import sys
from pathlib import Path

# package → (files to read, licence as its copyright file states it)
SOURCES = {
    "libreoffice-help-pt-br": ("/usr/share/libreoffice/help/pt-BR", "MPL-2.0 (LibreOffice help)"),
    "gimp-help-pt-br": ("/usr/share/gimp/2.0/help/pt_BR", "GFDL-1.2+ (no invariant sections)"),
    "debian-reference-pt-br": ("/usr/share/debian-reference", "GPL-2+"),
    "manpages-pt-br": ("/usr/share/man/pt_BR", "GPL-3+"),
    "fortunes-br": ("/usr/share/games/fortunes/brasil", "GPL-2+"),
}
BLOCKS = {"p", "li", "td", "th", "dd", "dt", "h1", "h2", "h3", "h4", "title", "div", "br", "tr", "pre"}
SKIP = {"script", "style", "code", "pre", "tt", "kbd", "samp"}
WORD = re.compile(r"[A-Za-zÀ-ÿ]+")
# Untranslated passages (English) are left out: more English than Portuguese function words.
PT = {"de", "o", "a", "os", "as", "que", "e", "do", "da", "dos", "das", "em", "no", "na", "um", "uma", "para", "com", "não", "se", "por", "é", "ao", "você"}
EN = {"the", "of", "and", "to", "is", "in", "for", "you", "this", "that", "with", "are", "be", "it", "on"}


class Paragraphs(html.parser.HTMLParser):
    """Text of an HTML page, cut at block elements; code and scripts left out."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.cur, self.skip = [], [], 0

    def flush(self):
        if self.cur:
            self.out.append(" ".join("".join(self.cur).split()))
            self.cur = []

    def handle_starttag(self, tag, attrs):
        if tag in SKIP:
            self.skip += 1
        if tag in BLOCKS:
            self.flush()

    def handle_endtag(self, tag):
        if tag in SKIP and self.skip:
            self.skip -= 1
        if tag in BLOCKS:
            self.flush()

    def handle_data(self, data):
        if not self.skip:
            self.cur.append(data)


def html_paragraphs(path):
    parser = Paragraphs()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.flush()
    return parser.out


def man_paragraphs(path):
    """Paragraphs of a roff man page: macros dropped, font escapes removed, text lines joined."""
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read() if path.suffix == ".gz" else path.read_text(errors="replace")
    paras, cur = [], []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            if line[1:3] in ("PP", "SH", "SS", "TP", "IP", "LP", "P ", "br", "sp") or line.strip() in (".P", ".PP"):
                paras.append(" ".join(cur))
                cur = []
            continue
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\\(..|\\&|\\-|\\e|\\[*][a-zA-Z(]+|\\s[-+]?\d", lambda m: "-" if m.group() == "\\-" else "", line)
        cur.append(line.strip())
    paras.append(" ".join(cur))
    return [" ".join(p.split()) for p in paras]


def fortune_paragraphs(path):
    return [" ".join(block.split()) for block in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]


def readable(p):
    """Running text: 4+ words, mostly letters, not a path, command or table of symbols."""
    words = WORD.findall(p)
    if len(words) < 4 or len(p) > 2000:
        return False
    lower = [w.lower() for w in words]
    if sum(w in EN for w in lower) >= sum(w in PT for w in lower):
        return False
    letters = sum(len(w) for w in words)
    return letters >= 0.6 * len(p.replace(" ", "")) and "/" not in p[:20] and not p.startswith(("$", "#", "-"))


def paragraphs(package, root):
    root = Path(root)
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    for f in files:
        if package == "fortunes-br":
            yield from fortune_paragraphs(f)
        elif package == "manpages-pt-br":
            yield from man_paragraphs(f)
        elif package == "debian-reference-pt-br" and ".pt-br." not in f.name:
            continue
        elif f.suffix in (".html", ".htm", ".xhtml"):
            yield from html_paragraphs(f)


def version(package):
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "target/corpus")
    missing = [p for p in SOURCES if not version(p)]
    if missing:
        print(f"installing {' '.join(missing)} (apt)", file=sys.stderr)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
    out.mkdir(parents=True, exist_ok=True)
    seen, per_source = set(), {}
    for package, (root, _) in SOURCES.items():
        kept = []
        for p in paragraphs(package, root):
            key = hashlib.sha1(p.lower().encode()).digest()
            if readable(p) and key not in seen:
                seen.add(key)
                kept.append(p)
        per_source[package] = kept
    # Interleave the sources so that any prefix of the file mixes them.
    lines, rows = [], list(per_source.values())
    for i in range(max(len(r) for r in rows)):
        lines.extend(r[i] for r in rows if i < len(r))
    (out / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    words = sum(len(l.split()) for l in lines)
    with open(out / "SOURCES.md", "w", encoding="utf-8") as f:
        f.write("| Debian package | version | licence | paragraphs | words |\n|---|---|---|---|---|\n")
        for package, (_, licence) in SOURCES.items():
            kept = per_source[package]
            f.write(f"| {package} | {version(package)} | {licence} | {len(kept):,} | {sum(len(l.split()) for l in kept):,} |\n")
    print(f"{out / 'corpus.txt'}: {len(lines):,} paragraphs, {words:,} words", file=sys.stderr)


if __name__ == "__main__":
    main()
