from __future__ import annotations

import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from illusions.tasks import code_corpus
from illusions.tasks.code_corpus import brace_functions, load_corpus, python_functions

PY_MODULE = '''\
import os


@decorator
def top(a, b=1):
    """Doc with a } brace."""
    return a + b


class Box:
\tdef method(self):
\t\tdef inner():
\t\t\treturn 1
\t\treturn inner()

async def later(): await x
class Text:
    def show(self):
        return """
first
"""
def semi(): return 1  # trailing comments are not part of the node
'''

JAVA_FILE = '''\
package demo;

/**
 * Example in a comment: public void fake() { }
 */
public class Demo<T> {
    static {
        if (ready) { init(); }
        register(new Handler() {
            public void handle() { }
        });
    }

    public Demo(int size) {
        this.size = size;
    }

    @Override
    public <R> List<R> map(Function<T, R> fn) throws IOException {
        String s = "{ not a block";
        char c = '}';
        Runnable r = new Runnable() {
            public void run() { go(); }
        };
        return null;
    }

    abstract void noBody();

    private static int[] values() { return new int[] {1, 2}; }
}
'''

JS_FILE = r'''
// function commented (x) { }
function plain (a, b) {
  return `${a} and ${b}`
}

const arrow = async (req) => {
  const re = /[{'"]+/g
  return req.replace(re, '')
}

class Thing {
  /**
   * Make one { for docs.
   */
  static create (opts) {
    if (opts) {
      return new Thing(opts)
    }
  }

  * items () {
    yield 1
  }

  /** How many { there are. */
  count () {
    return 0
  }
}

module.exports.handler = function (ev) {
  return ev
}
'''


def test_python_extractor_takes_every_def_dedented_without_decorators():
    got = python_functions(PY_MODULE)
    assert sorted(got) == sorted([
        'def top(a, b=1):\n    """Doc with a } brace."""\n    return a + b',
        "def method(self):\n\tdef inner():\n\t\treturn 1\n\treturn inner()",
        "def inner():\n\treturn 1",
        "async def later(): await x",
        "def semi(): return 1",
        'def show(self):\n    return """\nfirst\n"""',  # a column-0 string does not block the dedent
    ])


def test_java_extractor_skips_comments_strings_and_statements():
    got = brace_functions(JAVA_FILE, "java")
    # register(new Handler() {...}) in the static block looks like a signature but its brackets do
    # not balance, so only the method inside it is kept.
    assert [g.split("(")[0] for g in got] == ["public void handle", "public Demo", "public <R> List<R> map", "private static int[] values"]
    body = got[2]
    assert body.endswith("return null;\n}") and "public void run() { go(); }" in body  # nested stays inside
    assert body.startswith("public <R> List<R> map(Function<T, R> fn) throws IOException {\n    String s")


def test_javascript_extractor_handles_templates_regex_literals_and_methods():
    got = brace_functions(JS_FILE, "javascript")
    heads = [g.split("\n")[0] for g in got]
    assert heads == [
        "function plain (a, b) {",
        "const arrow = async (req) => {",
        "static create (opts) {",
        "* items () {",
        "count () {",
        "module.exports.handler = function (ev) {",
    ]
    assert got[1].endswith("return req.replace(re, '')\n}")
    assert got[2] == "static create (opts) {\n  if (opts) {\n    return new Thing(opts)\n  }\n}"


def test_machine_sources_are_found_where_present():
    root, files = code_corpus._stdlib_files()
    assert root == Path(sysconfig.get_paths()["stdlib"]) and files == sorted(files)
    assert not any("site-packages" in p.parts for p in files)
    assert any(p.name == "textwrap.py" for p in files)
    src = code_corpus.find_src_zip()
    if src is not None:  # the JDK's sources, when a JDK is installed
        with zipfile.ZipFile(src) as zf:
            names = code_corpus._java_names(zf)
            assert 0 < len(names) <= code_corpus.JAVA_MAX_FILES and names == sorted(names)
    npm = code_corpus.find_npm()
    if npm is not None:
        assert (npm / "package.json").is_file()


def test_stdlib_module_yields_its_functions():
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    got = python_functions(source)
    assert any(t.startswith("def dedent(text):") for t in got)
    assert all(not t[0].isspace() for t in got)


@pytest.mark.slow
def test_machine_corpus_builds_and_caches(tmp_path):
    # About 8-10 s on 2 shared cores (parsing ~730 stdlib files dominates), then ~0.3 s from cache.
    corpus = load_corpus("machine", cache_dir=tmp_path, max_per_language=20000)
    assert corpus.source == "machine" and corpus.prefix_chars == 0
    langs = corpus.languages()
    assert langs["python"] > 5000
    if code_corpus.find_src_zip() is not None:
        assert langs["java"] > 500
    if code_corpus.find_npm() is not None:
        assert langs["javascript"] > 500
    start = time.perf_counter()
    again = load_corpus("machine", cache_dir=tmp_path, max_per_language=20000)
    assert time.perf_counter() - start < 5 and again.fingerprint == corpus.fingerprint
