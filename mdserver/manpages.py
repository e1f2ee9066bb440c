"""Man pages (section 8) and bash completion, generated from the commands' argparse definitions.

    python -m mdserver.manpages OUTDIR

writes OUTDIR/mdserver.8, OUTDIR/mdserverctl.8, OUTDIR/mdserver-enroll.8
and OUTDIR/bash-completion/<command> for each. Standard library only: the
Debian package runs it at build time, offline. The page date is
SOURCE_DATE_EPOCH's (reproducible builds), none without it.
"""

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from mdserver import __version__

Section = Tuple[str, Sequence[Tuple[str, str]]]  # title, (term or "", text) paragraphs

CONFIG = "/etc/mdserver/mdserver.conf"
FILE_NAMES = ("config", "file", "output", "xml", "FILE", "CONFIG")  # dests/metavars: files
DIR_NAMES = ("STATE_DIR", "OUTDIR", "DIR")


@dataclass(frozen=True)
class Page:
    command: str
    parser: Callable[[], argparse.ArgumentParser]
    summary: str                      # the NAME line
    sections: Sequence[Section]       # after OPTIONS (and COMMANDS)


def _daemon_parser() -> argparse.ArgumentParser:
    from mdserver.cli import parser
    return parser()


def _ctl_parser() -> argparse.ArgumentParser:
    from mdserver.ctl import parser
    return parser()


def _enroll_parser() -> argparse.ArgumentParser:
    from mdserver.enroll import parser
    return parser()


SEE_ALSO = ("mdserver", "mdserverctl", "mdserver-enroll")


def _see_also(command: str) -> Section:
    others = [f"\\fB{c}\\fR(8)" for c in SEE_ALSO if c != command]
    return ("SEE ALSO", [("", ", ".join(others + ["\\fBvirsh\\fR(1)", "\\fBdnsmasq\\fR(8)"])
                          + ". The README of mdserver describes the configuration keys, the "
                            "routes guests take and the shared registry.")])


PAGES = (
    Page("mdserver", _daemon_parser, "EC2-compatible metadata service for libvirt guests", (
        ("SIGNALS", [
            ("SIGHUP", "reopen the log file (logrotate; systemctl reload mdserver)"),
            ("SIGTERM", "stop serving and exit")]),
        ("EXIT STATUS", [
            ("0", "stopped on request"),
            ("1", "could not start or serve (one log line says why)"),
            ("2", "configuration error (systemd does not restart it)")]),
        ("FILES", [
            (CONFIG, "the configuration"),
            ("/var/lib/mdserver", "the instance database, token key, dnsmasq files and "
                                  "seed images"),
            ("/run/mdserver/admin.sock", "the admin socket (mdserverctl, the libvirt hook, "
                                         "mdserver-enroll)")]),
        _see_also("mdserver"))),
    Page("mdserverctl", _ctl_parser, "administer mdserver, the metadata service", (
        ("EXIT STATUS", [
            ("0", "done (status: every check ok or unknown)"),
            ("1", "failed, with one line on standard error (status: a check has a "
                  "problem; route: the route is not in place)"),
            ("2", "configuration error, or bad command line")]),
        ("FILES", [
            (CONFIG, "the configuration (-c to use another)"),
            ("/run/mdserver/admin.sock", "the daemon's admin socket (root or group mdserver); "
                                         "with the daemon down, list, show and store status "
                                         "read the database instead")]),
        _see_also("mdserverctl"))),
    Page("mdserver-enroll", _enroll_parser,
         "give libvirt domains their mdserver route and register them", (
             ("EXIT STATUS", [
                 ("0", "stopped on request"),
                 ("1", "libvirt's Python binding is missing, or another failure"),
                 ("2", "configuration error (systemd does not restart it)")]),
             ("FILES", [(CONFIG, "the configuration ([libvirt] uri, route, enroll)")]),
             _see_also("mdserver-enroll"))),
)


# -- reading argparse ----------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> Optional[argparse._SubParsersAction]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _commands(parser: argparse.ArgumentParser) -> List[Tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in definition order."""
    sub = _subparsers(parser)
    if sub is None:
        return []
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    return [(name, helps.get(name, ""), p) for name, p in sub.choices.items()]


def _options(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _positionals(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    return [a for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None and action.option_strings:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:  # as argparse expands it
        params = dict(vars(action), prog=prog)
        if action.choices is not None:
            params["choices"] = ", ".join(map(str, action.choices))
        text = text % params
    return text


# -- roff ----------------------------------------------------------------------------------

_DASHES = re.compile(r"(?<![\w-])(--?)(?=[\w{])")


def esc(text: str) -> str:
    """Text for a roff line: backslashes escaped, an option's dashes as \\-
    (minus signs that copy as they print), no leading control character."""
    text = text.replace("\\", "\\e")
    text = _DASHES.sub(lambda m: m.group(1).replace("-", "\\-"), text)
    return "\\&" + text if text[:1] in (".", "'") else text


def _option_roff(action: argparse.Action) -> str:
    value = f" \\fI{esc(_metavar(action))}\\fR" if _takes_value(action) else ""
    return ", ".join(f"\\fB{esc(o)}\\fR{value}" for o in action.option_strings)


def _synopsis_items(parser: argparse.ArgumentParser) -> List[str]:
    items = []
    for a in _options(parser):
        if a.dest == "help":
            continue
        value = f" \\fI{esc(_metavar(a))}\\fR" if _takes_value(a) else ""
        item = f"\\fB{esc(a.option_strings[-1])}\\fR{value}"
        items.append(item if a.required else f"[{item}]")
    for a in _positionals(parser):
        name = f"\\fI{esc(_metavar(a))}\\fR"
        items.append(f"[{name}]" if a.nargs == "?" else name)
    if _subparsers(parser) is not None:
        items.append("\\fICOMMAND\\fR ...")
    return items


def _page_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y-%m-%d", time.gmtime(int(epoch))) if epoch else ""


def _describe_arguments(parser: argparse.ArgumentParser, prog: str) -> List[str]:
    out = []
    for a in _positionals(parser) + [o for o in _options(parser) if o.dest != "help"]:
        term = f"\\fI{esc(_metavar(a))}\\fR" if not a.option_strings else _option_roff(a)
        out += [".TP", term, esc(_help(a, prog)) or "\\&"]
    return out


def _command_roff(path: List[str], help_text: str, parser: argparse.ArgumentParser,
                  prog: str) -> List[str]:
    name = " ".join(path)
    out = [f'.SS "{esc(name)}"', ".PP",
           f"\\fB{esc(prog)} {esc(name)}\\fR " + " ".join(_synopsis_items(parser)),
           ".PP", esc(parser.description or help_text)]
    out += _describe_arguments(parser, f"{prog} {name}")
    for sub, sub_help, sub_parser in _commands(parser):
        out += _command_roff(path + [sub], sub_help, sub_parser, prog)
    return out


def render_page(page: Page) -> str:
    parser = page.parser()
    prog = page.command
    title = esc(prog.upper()).replace("-", "\\-")
    lines = [f".\\\" Generated by mdserver.manpages from {prog}'s argparse definition.",
             f'.TH {title} 8 "{_page_date()}" '
             f'"mdserver {__version__}" "System Administration"',
             ".SH NAME", f"{esc(prog)} \\- {esc(page.summary)}",
             ".SH SYNOPSIS", f".B {esc(prog)}", " ".join(_synopsis_items(parser)),
             ".SH DESCRIPTION", esc(parser.description or page.summary),
             ".SH OPTIONS"]
    lines += _describe_arguments(parser, prog)
    if _commands(parser):
        lines.append(".SH COMMANDS")
        for name, help_text, sub in _commands(parser):
            lines += _command_roff([name], help_text, sub, prog)
    for title, paragraphs in page.sections:
        lines.append(f".SH {title}")
        for term, text in paragraphs:
            # static texts here may carry roff fonts (\fB): escaped only at the start
            lines += [".TP", esc(term), text] if term else [".PP", text]
    return "\n".join(lines) + "\n"


# -- bash completion --------------------------------------------------------------------

def _value_kind(action: argparse.Action) -> str:
    """How to complete an option's value or a positional: a compgen argument."""
    if action.choices is not None:
        return "-W '" + " ".join(map(str, action.choices)) + "'"
    names = {action.dest, str(action.metavar)}
    if names & set(DIR_NAMES):
        return "-d"
    if names & set(FILE_NAMES):
        return "-f"
    return ""


def _levels(parser: argparse.ArgumentParser, path: str = ""
            ) -> List[Tuple[str, argparse.ArgumentParser]]:
    out = [(path, parser)]
    for name, _, sub in _commands(parser):
        out += _levels(sub, f"{path} {name}".strip())
    return out


def render_completion(page: Page) -> str:
    parser = page.parser()
    fn = "_" + page.command.replace("-", "_")
    levels = _levels(parser)
    walk, values, words = [], [], []
    for path, p in levels:
        for a in _options(p):
            if _takes_value(a):
                pattern = "|".join(f'"{path}|{o}"' for o in a.option_strings)
                walk.append(f"            {pattern}) skip=1 ;;")
                kind = _value_kind(a)
                action = (f'_mds_reply {kind}' if kind else "COMPREPLY=()")
                values.append(f"        {pattern}) {action}; return ;;")
        for name, _, _ in _commands(p):
            below = f"{path} {name}".strip()
            walk.append(f'            "{path}|{name}") path="{below}" ;;')
        options = " ".join(o for a in _options(p) for o in a.option_strings)
        subs = " ".join(name for name, _, _ in _commands(p))
        kinds = [k for k in (_value_kind(a) for a in _positionals(p)) if k]
        rest = (f"-W '{subs}'" if subs else kinds[0] if kinds else "")
        words.append(f'        "{path}") opts="{options}"; rest="{rest}" ;;')
    return "\n".join([
        f"# bash completion for {page.command}; generated by mdserver.manpages from its",
        "# argparse definition: do not edit.",
        "",
        "_mds_reply() {",
        "    # COMPREPLY from compgen's options ($@) for the current word",
        '    if [[ "$1" == -f || "$1" == -d ]]; then compopt -o filenames 2>/dev/null; fi',
        '    mapfile -t COMPREPLY < <(compgen "$@" -- "$cur")',
        "}",
        "",
        f"{fn}() {{",
        "    local cur prev path i w skip opts rest",
        '    cur=${COMP_WORDS[COMP_CWORD]}',
        '    prev=${COMP_WORDS[COMP_CWORD-1]}',
        '    path="" skip=0',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w=${COMP_WORDS[i]}',
        "        if ((skip)); then skip=0; continue; fi",
        '        case "$path|$w" in',
        *walk,
        "        esac",
        "    done",
        '    if ((COMP_CWORD > 1)) && ((skip)); then',
        '        case "$path|$prev" in',
        *values,
        "        esac",
        "    fi",
        '    case "$path" in',
        *words,
        '        *) opts="" rest="" ;;',
        "    esac",
        '    if [[ "$cur" == -* || -z "$rest" ]]; then',
        '        _mds_reply -W "$opts"',
        "    else",
        "        eval \"_mds_reply $rest\"",
        "    fi",
        "}",
        f"complete -F {fn} {page.command}",
        ""])


# -- the command ---------------------------------------------------------------------------

def write_all(outdir: str) -> List[str]:
    """Every page and completion file under `outdir`; the paths written."""
    written = []
    os.makedirs(os.path.join(outdir, "bash-completion"), exist_ok=True)
    for page in PAGES:
        for path, text in ((os.path.join(outdir, page.command + ".8"), render_page(page)),
                           (os.path.join(outdir, "bash-completion", page.command),
                            render_completion(page))):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            written.append(path)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m mdserver.manpages OUTDIR", file=sys.stderr)
        return 2
    for path in write_all(args[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
