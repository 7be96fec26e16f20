"""Shell completions (bash, zsh, fish) and man pages, generated from the argparse parsers.

The parsers are the one description of the command line, so nothing here lists a
command or an option by hand: :func:`walk` flattens a parser into :class:`Command`
nodes (a path such as ``nixd nar hash``, its options, positionals and subcommands),
and each generator renders that table. A command added to :mod:`nixd.cli` is completed
and documented without touching this module.

The completion scripts share one model, rendered in each shell's idiom: walk the words
typed so far from the program name, descending into a subcommand whenever a word names
one of the current command's subcommands; then offer that command's subcommands and
options, an option's choices after an option that takes a value (files when it has none),
and files for a positional. They need nothing but the shell (no call back into nixd, so
completing is instant).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from nixd.bounds import parse_uint
from nixd.errors import FormatError

SHELLS = ("bash", "zsh", "fish")


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    help: str
    takes_value: bool
    choices: tuple[str, ...] = ()
    metavar: str = ""


@dataclass(frozen=True)
class Positional:
    name: str
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False


@dataclass
class Command:
    path: tuple[str, ...]
    parser: argparse.ArgumentParser
    help: str = ""
    options: list[Option] = field(default_factory=list)
    positionals: list[Positional] = field(default_factory=list)
    subcommands: dict[str, str] = field(default_factory=dict)
    """name → one-line help"""

    @property
    def key(self) -> str:
        return "/".join(self.path)


def _text(value: object) -> str:
    if value is None or value == argparse.SUPPRESS:
        return ""
    return " ".join(str(value).split())


def walk(parser: argparse.ArgumentParser, prog: str | None = None) -> list[Command]:
    """Every command of ``parser``, the program itself first, depth first in help order."""
    out: list[Command] = []

    def visit(p: argparse.ArgumentParser, path: tuple[str, ...], help_text: str) -> None:
        cmd = Command(path, p, help_text)
        out.append(cmd)
        children: list[tuple[str, argparse.ArgumentParser, str]] = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: _text(a.help) for a in action._choices_actions}
                for name, child in action.choices.items():
                    cmd.subcommands[name] = helps.get(name, "")
                    children.append((name, child, helps.get(name, "")))
            elif action.option_strings:
                if action.help == argparse.SUPPRESS:
                    continue
                choices = tuple(str(c) for c in action.choices) if action.choices else ()
                metavar = action.metavar if isinstance(action.metavar, str) else ""
                cmd.options.append(
                    Option(
                        tuple(action.option_strings),
                        _text(action.help),
                        action.nargs != 0,
                        choices,
                        metavar or action.dest.upper(),
                    )
                )
            else:
                name = action.metavar if isinstance(action.metavar, str) else action.dest
                choices = tuple(str(c) for c in action.choices) if action.choices else ()
                cmd.positionals.append(
                    Positional(name, _text(action.help), choices, action.nargs in ("?", "*"))
                )
        for name, child, child_help in children:
            visit(child, (*path, name), child_help)

    visit(parser, (prog or parser.prog,), _text(parser.description))
    return out


def _func(prog: str) -> str:
    return "_" + re.sub(r"[^A-Za-z0-9_]", "_", prog)


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _descend_cases(commands: list[Command]) -> list[str]:
    return [f"{c.key}/{name}" for c in commands for name in c.subcommands]


def bash(parser: argparse.ArgumentParser, prog: str | None = None) -> str:
    """A bash completion script: ``source <(nixd completion bash)``."""
    commands = walk(parser, prog)
    prog = commands[0].path[0]
    fn = _func(prog)
    lines = [
        f"# bash completion for {prog}, generated from its argument parser",
        f"{fn}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" cmd=' + _sh_quote(prog) + " i w words",
        '    (( COMP_CWORD > 0 )) && prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w="${COMP_WORDS[i]}"',
        '        case "$cmd/$w" in',
    ]
    descend = _descend_cases(commands)
    if descend:
        lines.append(
            "            " + "|".join(_sh_quote(d) for d in descend) + ') cmd="$cmd/$w" ;;'
        )
    lines += ["        esac", "    done", '    case "$cmd:$prev" in']
    for c in commands:
        for o in c.options:
            if not o.takes_value:
                continue
            pats = "|".join(_sh_quote(f"{c.key}:{f}") for f in o.flags)
            if o.choices:
                choice_words = _sh_quote(" ".join(o.choices))
                lines.append(
                    f'        {pats}) COMPREPLY=($(compgen -W {choice_words} -- "$cur")); return ;;'
                )
            else:
                lines.append(f"        {pats}) COMPREPLY=(); return ;;")
    lines += ["    esac", '    case "$cmd" in']
    for c in commands:
        words = [*c.subcommands, *(f for o in c.options for f in o.flags)]
        words += [ch for p in c.positionals for ch in p.choices]
        lines.append(f"        {_sh_quote(c.key)}) words={_sh_quote(' '.join(words))} ;;")
    lines += [
        '        *) words="" ;;',
        "    esac",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        f"complete -o bashdefault -o default -F {fn} {prog}",
        "",
    ]
    return "\n".join(lines)


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_item(word: str, help_text: str) -> str:
    return _zsh_quote(word.replace(":", "\\:") + (":" + help_text if help_text else ""))


def zsh(parser: argparse.ArgumentParser, prog: str | None = None) -> str:
    """A zsh completion function: save as ``_nixd`` on ``$fpath``, or ``source <(...)``."""
    commands = walk(parser, prog)
    prog = commands[0].path[0]
    fn = _func(prog)
    lines = [
        f"#compdef {prog}",
        f"# zsh completion for {prog}, generated from its argument parser",
        f"{fn}() {{",
        f"    local cmd={_zsh_quote(prog)} w i prev files=0",
        "    local -a items",
        "    for ((i = 2; i < CURRENT; i++)); do",
        "        w=${words[i]}",
        '        case "$cmd/$w" in',
    ]
    descend = _descend_cases(commands)
    if descend:
        lines.append(
            "            (" + "|".join(_zsh_quote(d) for d in descend) + ') cmd="$cmd/$w" ;;'
        )
    lines += [
        "        esac",
        "    done",
        "    prev=${words[CURRENT-1]}",
        '    case "$cmd:$prev" in',
    ]
    for c in commands:
        for o in c.options:
            if not o.takes_value:
                continue
            pats = "|".join(_zsh_quote(f"{c.key}:{f}") for f in o.flags)
            if o.choices:
                choice_items = " ".join(_zsh_quote(ch) for ch in o.choices)
                lines.append(f"        ({pats}) compadd -- {choice_items}; return ;;")
            else:
                lines.append(f"        ({pats}) _files; return ;;")
    lines += ["    esac", '    case "$cmd" in']
    for c in commands:
        items = [_zsh_item(n, h) for n, h in c.subcommands.items()]
        items += [_zsh_item(f, o.help) for o in c.options for f in o.flags]
        items += [_zsh_item(ch, p.help) for p in c.positionals for ch in p.choices]
        files = any(not p.choices for p in c.positionals)
        body = f"items=({' '.join(items)})" + ("; files=1" if files else "")
        lines.append(f"        ({_zsh_quote(c.key)}) {body} ;;")
    lines += [
        "    esac",
        "    (( files )) && _files",
        "    (( ${#items} )) && _describe -t commands " + _zsh_quote(prog) + " items",
        "}",
        f'if [[ "$funcstack[1]" == {fn} ]]; then {fn} "$@"; else compdef {fn} {prog}; fi',
        "",
    ]
    return "\n".join(lines)


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish(parser: argparse.ArgumentParser, prog: str | None = None) -> str:
    """A fish completion script: save as ``~/.config/fish/completions/nixd.fish``."""
    commands = walk(parser, prog)
    prog = commands[0].path[0]
    fn = _func(prog)
    descend = _descend_cases(commands)
    lines = [
        f"# fish completion for {prog}, generated from its argument parser",
        f"function {fn}_command",
        "    set -l tokens (commandline -opc)",
        f"    set -l cmd {_fish_quote(prog)}",
        "    for t in $tokens[2..-1]",
        '        switch "$cmd/$t"',
        "            case " + " ".join(_fish_quote(d) for d in descend),
        '                set cmd "$cmd/$t"',
        "        end",
        "    end",
        "    echo $cmd",
        "end",
        f"function {fn}_is",
        f'    test ({fn}_command) = "$argv[1]"',
        "end",
        f"complete -c {prog} -f",
    ]
    for c in commands:
        cond = f"-n {_fish_quote(f'{fn}_is {c.key}')}"
        for name, help_text in c.subcommands.items():
            lines.append(
                f"complete -c {prog} {cond} -a {_fish_quote(name)} -d {_fish_quote(help_text)}"
            )
        for o in c.options:
            spec = []
            for f in o.flags:
                if f.startswith("--"):
                    spec.append(f"-l {_fish_quote(f[2:])}")
                elif len(f) == 2:
                    spec.append(f"-s {_fish_quote(f[1:])}")
                else:
                    spec.append(f"-o {_fish_quote(f[1:])}")
            if o.takes_value:
                spec.append(f"-x -a {_fish_quote(' '.join(o.choices))}" if o.choices else "-r -F")
            lines.append(
                f"complete -c {prog} {cond} {' '.join(spec)} -d {_fish_quote(o.help)}".rstrip()
            )
        for p in c.positionals:
            if p.choices:
                lines.append(
                    f"complete -c {prog} {cond} -a {_fish_quote(' '.join(p.choices))} "
                    f"-d {_fish_quote(p.help)}"
                )
            else:
                lines.append(f"complete -c {prog} {cond} -F")
    lines.append("")
    return "\n".join(lines)


def completion(shell: str, parser: argparse.ArgumentParser, prog: str | None = None) -> str:
    """The completion script for ``shell`` (one of :data:`SHELLS`)."""
    generators = {"bash": bash, "zsh": zsh, "fish": fish}
    return generators[shell](parser, prog)


def _roff(text: str) -> str:
    """Text escaped for roff: backslashes, and a leading dot or quote on any line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        ("\\&" + line if line.startswith((".", "'")) else line) for line in text.splitlines()
    )


def _prose(p: argparse.ArgumentParser, text: str | None) -> list[str]:
    """A description or epilog as roff: kept line by line where the parser keeps it so."""
    if not text or text == argparse.SUPPRESS:
        return []
    raw = p.formatter_class
    if isinstance(raw, type) and issubclass(raw, argparse.RawDescriptionHelpFormatter):
        return [".PP", ".nf", _roff(text.strip("\n")), ".fi"]
    return [".PP", _roff(_text(text))]


def _build_date() -> str:
    """Today, or ``$SOURCE_DATE_EPOCH``'s day, so packaged pages are reproducible."""
    try:
        epoch = parse_uint(
            os.environ.get("SOURCE_DATE_EPOCH", ""), limit=1 << 37, what="SOURCE_DATE_EPOCH"
        )
    except FormatError:
        return datetime.date.today().isoformat()
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).date().isoformat()


def _usage(p: argparse.ArgumentParser) -> str:
    return " ".join(p.format_usage().removeprefix("usage: ").split())


def man(
    parser: argparse.ArgumentParser,
    *,
    section: int = 1,
    prog: str | None = None,
    version: str = "",
    date: str | None = None,
    exit_codes: Sequence[tuple[int, str, str]] = (),
    summary: str = "",
) -> str:
    """A man page (roff, ``man(7)`` macros) with every command of ``parser``.

    ``exit_codes`` are (code, name, meaning) rows for an EXIT STATUS section; ``summary``
    is the NAME line (default: the description's first sentence).
    """
    commands = walk(parser, prog)
    top = commands[0]
    name = top.path[0]
    day = date or _build_date()
    source = f"{name} {version}".strip()
    out = [
        f'.TH "{name.upper()}" "{section}" "{day}" "{source}" "User Commands"',
        ".SH NAME",
        f"{_roff(name)} \\- {_roff(summary or top.help.split('. ')[0].rstrip('.'))}",
        ".SH SYNOPSIS",
        f".B {_roff(name)}",
        _roff(_usage(top.parser).removeprefix(name).strip()),
        ".SH DESCRIPTION",
        *_prose(top.parser, top.parser.description),
    ]

    def options(c: Command) -> None:
        for o in c.options:
            flags = ", ".join(f"\\fB{_roff(f)}\\fR" for f in o.flags)
            value = f" \\fI{_roff(o.metavar)}\\fR" if o.takes_value else ""
            out.extend([".TP", flags + value, _roff(o.help or "")])
        for p in c.positionals:
            out.extend([".TP", f"\\fI{_roff(p.name)}\\fR", _roff(p.help or "")])

    out.append(".SH OPTIONS")
    options(top)
    out.append(".SH COMMANDS")
    for c in commands[1:]:
        out.extend([".SS " + _roff(" ".join(c.path[1:])), ".nf", _roff(_usage(c.parser)), ".fi"])
        out.extend(_prose(c.parser, c.parser.description or c.help))
        options(c)
        out.extend(_prose(c.parser, c.parser.epilog))
    if exit_codes:
        out.append(".SH EXIT STATUS")
        for code, _, meaning in exit_codes:
            out.extend([".TP", f"\\fB{code}\\fR", _roff(meaning)])
    if top.parser.epilog:
        out.extend([".SH NOTES", *_prose(top.parser, top.parser.epilog)])
    out.append("")
    return "\n".join(out)
