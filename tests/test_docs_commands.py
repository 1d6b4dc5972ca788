"""Every command the docs show still parses: each flag of each `python -m adtr_jax...`, `adtr-jax` and
`python experiments/...` command in README.md, BENCHMARKS.md and docs/*.md is one its program defines
(read from the program's own --helpfull), and every config field it names (--config.a.b=, --sweep=,
--set=) is a field of adtr_jax/defaults.py. A renamed flag or field breaks this test, not the docs."""
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from adtr_jax import defaults
from tests.conftest import REPO

DOCS = [REPO / 'README.md', REPO / 'BENCHMARKS.md', *sorted((REPO / 'docs').glob('*.md'))]
_FENCE = re.compile(r'```(?:bash|sh|shell)\n(.*?)```', re.S)
_INLINE = re.compile(r'`((?:python3? |adtr-jax )[^`]+)`')
_PROGRAM = re.compile(r'^(?:python3?(?:\.\d+)? -m (adtr_jax[\w.]*)|adtr-jax|python3? (experiments/[\w/]+\.py))\b')
# Flags whose value names config fields: 'a.b=v1,v2' (--sweep) or 'a.b=v,c.d=w' (--set).
_FIELD_LISTS = ('sweep', 'set')


def commands(text: str) -> list[str]:
  """The adtr_jax commands of a Markdown text: in ```bash blocks (one per `&&`, `;`, `|` or line,
  continuations and quoted newlines joined; also inside a quoted --command="..." of a launcher) and in
  inline code spans."""
  found = []
  for block in _FENCE.findall(text):
    line = ''
    for piece in block.replace('\\\n', ' ').splitlines():
      line += piece
      try:
        found += _split(line)
      except ValueError:     # a quote open across lines (gcloud --command="...")
        line += ' '
        continue
      line = ''
  found += [span.strip() for span in _INLINE.findall(text)]
  return [c for c in found if _PROGRAM.match(c) and '...' not in c]


def _split(line: str) -> list[str]:
  """A shell line -> its commands (split at unquoted &&, ;, |; comments dropped), and the commands
  inside a quoted argument that holds one."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
  lexer.whitespace_split, lexer.commenters = True, '#'
  parts, tokens = [], []
  for token in list(lexer) + [';']:
    if token.strip(';&|'):
      tokens.append(token)
      if ' ' in token and re.search(r'python3? (-m adtr_jax|experiments/)', token):
        parts += _split(token[token.index('python'):])
    elif tokens:
      parts.append(shlex.join(_from_program(tokens)))
      tokens = []
  return parts


def _from_program(tokens: list[str]) -> list[str]:
  """The command from its program on: `XLA_FLAGS=... python -m ...` and `srun ... python -m ...` too."""
  for i, token in enumerate(tokens):
    if _PROGRAM.match(shlex.join(tokens[i:i + 3])):
      return tokens[i:]
  return tokens


def program(command: str) -> list[str]:
  """The argv that runs the command's program (adtr-jax is python -m adtr_jax.main)."""
  m = _PROGRAM.match(command)
  if m.group(1):
    return [sys.executable, '-m', m.group(1)]
  if m.group(2):
    return [sys.executable, m.group(2)]
  return [sys.executable, '-m', 'adtr_jax.main']


@functools.cache
def defined_flags(argv: tuple[str, ...]) -> frozenset[str]:
  """Every --flag the program's --helpfull lists (absl's --[no]name: both spellings)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([*argv, '--helpfull'], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  names = set()
  for no, name in re.findall(r'--(\[no\])?([A-Za-z_][\w.-]*)', out.stdout + out.stderr):
    names |= {name, f'no{name}'} if no else {name}
  assert len(names) > 2, f'{argv}: --helpfull listed no flags:\n{out.stdout[-2000:]}{out.stderr[-2000:]}'
  return frozenset(names)


def has_field(path: str) -> bool:
  config = defaults.get_config()
  for part in path.split('.'):
    if not hasattr(config, 'keys') or part not in config:
      return False
    config = config[part]
  return True


def problems(command: str) -> list[str]:
  """What is wrong with one command's flags: unknown flags and unknown config fields."""
  flags = defined_flags(tuple(program(command)))
  out = []
  for token in shlex.split(command)[1:]:
    if not token.startswith('--'):
      continue
    name, _, value = token[2:].partition('=')
    if name.startswith('config.'):
      if not has_field(name[len('config.'):]):
        out.append(f'config field {name[len("config."):]} is not in adtr_jax/defaults.py')
    elif name not in flags:
      out.append(f'flag --{name} is not defined')
    elif name in _FIELD_LISTS:
      fields = re.findall(r'(?:^|,)([A-Za-z_][\w]*(?:\.[\w]+)+)=', value)
      out += [f'--{name}: config field {f} is not in adtr_jax/defaults.py' for f in fields
              if not has_field(f)]
  return out


def _all_commands():
  return [(doc.relative_to(REPO).as_posix(), c) for doc in DOCS for c in commands(doc.read_text())]


def test_the_docs_show_commands():
  """The control for the test below: it reads the commands the README is known to hold."""
  found = [c for doc, c in _all_commands() if doc == 'README.md']
  assert any(c.startswith('python -m adtr_jax.main --config=configs/elpv.py') for c in found)
  assert any(c.startswith('python experiments/sweep.py') for c in found)


@pytest.mark.parametrize('doc,command', _all_commands())
def test_every_flag_in_the_docs_exists(doc, command):
  assert not problems(command), f'{doc}: {command}'


def test_a_renamed_flag_or_field_is_caught():
  text = ('```bash\npython -m adtr_jax.main --config=configs/elpv.py --workdir=w \\\n'
          '    --config.train.num_epoch=3 --work_dir=x\n'
          "python experiments/sweep.py --config=configs/elpv.py --workdir=w --sweep='train.lr=1e-3'\n```\n")
  found = commands(text)
  assert len(found) == 2
  assert problems(found[0]) == ['config field train.num_epoch is not in adtr_jax/defaults.py',
                                'flag --work_dir is not defined']
  assert problems(found[1]) == ['--sweep: config field train.lr is not in adtr_jax/defaults.py']
