"""What a cached vector depends on besides its EmbedSpec and its text: the code that computes it
and the content of the checkpoint's files. Both are found, not listed.

The code: starting from the few entry points that turn a checkpoint and texts into vectors
(ENTRY_POINTS), every name they use is followed to its definition in the project's modules
(functions, methods, classes, module-level constants, functions handed around as values, a new
module the path imports), and each definition reached is hashed from its syntax tree under its
name within its module ("Class.method"). Only the entry points and the boundary (BOUNDARY: code
that decides where files come from) are named by hand. It may over-approximate, never
under-approximate: a name read as an attribute (obj.name) matches every definition of that name
in the modules reached, since Python cannot tell which object it will be. What cannot change a
vector is left out of each tree: docstrings, comments and formatting (not in a syntax tree), line
numbers, the text of raised errors and of log lines, and the module a definition lives in.

The weights: a SHA-256 of each file's whole content, remembered per file (by path, size, inode and
modification and change times) in the cache folder, so that an unchanged multi-GB file is read in
full once, not at every run.
"""

import ast
import copy
import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project: modules are files under it

# Where a text and a checkpoint become a vector: tokenizer loading and tokenize, config parsing,
# building and loading the model and its forward pass, pooling, and the add-ons' weight formats,
# attention and float16 guard.
ENTRY_POINTS = ("qwen_embed.load_tokenizer", "qwen_embed.tokenize", "qwen_embed.Qwen3Config",
                "qwen_embed.Qwen3Model", "qwen_embed.load_weights", "qwen_embed.pool",
                "at_scale.weights.load_stored", "at_scale.weights.guard_float16",
                "at_scale.runtime.varlen_attention")
# Reached, but deciding only where the files come from (a local folder or the Hub's cache): the
# files' content is fingerprinted instead (model_identity).
BOUNDARY = ("qwen_embed.resolve_model_dir",)
LOG_CALLS = ("log", "print", "warn")  # a call to one of these says something; it computes nothing


def module_file(name):
    """The file of a project module, or None for a module outside the project (torch, ...)."""
    path = ROOT / Path(*name.split("."))
    for file in (path.with_suffix(".py"), path / "__init__.py"):
        if file.is_file():
            return file
    return None


class Module:
    """One parsed project module: its definitions by qualified name, and what its imports bind."""

    def __init__(self, name):
        self.name, tree = name, ast.parse(module_file(name).read_text("utf-8"))
        self.defs, self.imports = {}, {}
        for node in tree.body:
            for qualname, definition in definitions(node):
                self.defs[qualname] = definition
        for node in ast.walk(tree):  # imports inside functions bind names too
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.imports[a.asname or a.name.split(".")[0]] = (
                        (a.name, None) if a.asname else (a.name.split(".")[0], None))
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.imports[a.asname or a.name] = (node.module, a.name)

    def resolve(self, name):
        """A name as this module binds it -> ("def", module, qualname), ("module", module) or
        None (a builtin, a local variable, or something outside the project)."""
        if name in self.defs:
            return "def", self.name, name
        if name not in self.imports:
            return None
        module, attr = self.imports[name]
        if attr is None:
            return ("module", module) if module_file(module) else None
        if module_file(f"{module}.{attr}"):  # from at_scale import weights
            return "module", f"{module}.{attr}"
        return ("def", module, attr) if module_file(module) else None


def definitions(node, prefix=""):
    """(qualified name, node) for a module-level statement: a function, a class and each of its
    methods and class attributes, or the names an assignment binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield prefix + node.name, node
    elif isinstance(node, ast.ClassDef):
        yield prefix + node.name, node
        for member in node.body:
            yield from definitions(member, f"{prefix}{node.name}.")
    elif isinstance(node, (ast.Try, ast.If)) and not prefix and not is_main(node):
        for part in (node.body, node.orelse, getattr(node, "finalbody", []),
                     *[h.body for h in getattr(node, "handlers", [])]):
            for member in part:
                yield from definitions(member)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    yield prefix + name.id, node


def is_main(node):
    """`if __name__ == "__main__":`, a script's command line: it talks to a user, never to a
    caller that computes a vector."""
    return isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)


@functools.cache
def parsed(name):
    return Module(name)


@functools.cache
def code_fingerprint():
    """(fingerprint, {qualname: hash}) of every definition the vector computation reaches, keyed
    by its name within its module alone, so that moving a definition to another module changes
    nothing (two reached definitions of one name hash together)."""
    hashes = {}
    for module, qualname in sorted(reach(ENTRY_POINTS, BOUNDARY)):
        hashes[qualname] = "+".join(filter(None, [hashes.get(qualname),
                                                  tree_hash(parsed(module), qualname)]))
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16], hashes


def reach(entry_points, boundary):
    """The set of (module, qualname) the entry points reach, following names to definitions."""
    todo, seen, modules = [], set(), set()
    for entry in entry_points:
        module, _, qualname = entry.rpartition(".")
        while module and not module_file(module):  # at_scale.embedder.Embedder.load
            module, _, head = module.rpartition(".")
            qualname = f"{head}.{qualname}"
        if not module or qualname not in parsed(module).defs:
            raise RuntimeError(f"fingerprint entry point {entry} is defined nowhere")
        todo.append((module, qualname))
    stop = set()
    for name in boundary:
        module, _, qualname = name.rpartition(".")
        if qualname not in parsed(module).defs:
            raise RuntimeError(f"fingerprint boundary {name} is defined nowhere")
        stop.add((module, qualname))
    pending_attrs = set()  # attribute names read before their module was reached
    while todo:
        module, qualname = todo.pop()
        if (module, qualname) in seen or (module, qualname) in stop:
            continue
        seen.add((module, qualname))
        if module not in modules:  # a new module: its definitions may answer earlier attributes
            modules.add(module)
            todo += [(module, q) for q in parsed(module).defs if q.rpartition(".")[2] in
                     pending_attrs]
        node = parsed(module).defs[qualname]
        if isinstance(node, ast.ClassDef):  # a class: all of it (calling it runs __init__, a
            todo += [(module, q) for q in parsed(module).defs  # module's __call__ its forward)
                     if q.startswith(qualname + ".")]
        for kind, *ref in references(parsed(module), node):
            if kind == "def":
                todo.append(tuple(ref))
            elif kind == "attr":
                pending_attrs.add(ref[0])
                todo += [(m, q) for m in modules for q in parsed(m).defs
                         if q.rpartition(".")[2] == ref[0]]
    return seen


def references(module, node):
    """What a definition's code names: ("def", module, qualname) for a name resolved through the
    module, ("attr", name) for an attribute of anything but a project module."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load):
            found = module.resolve(sub.id)
            if found and found[0] == "def":
                yield found
        elif isinstance(sub, ast.Attribute):
            base = module.resolve(sub.value.id) if isinstance(sub.value, ast.Name) else None
            if base and base[0] == "module":
                target = parsed(base[1]).resolve(sub.attr)
                if target and target[0] == "def":
                    yield target
                elif module_file(f"{base[1]}.{sub.attr}"):  # at_scale.weights as an attribute
                    continue
            else:
                yield "attr", sub.attr


def tree_hash(module, qualname):
    """The hash of a definition's syntax tree without what cannot change a vector."""
    node = module.defs[qualname]
    if isinstance(node, ast.ClassDef):  # its members are hashed under their own names
        node = copy.copy(node)
        node.body = []
    return hashlib.sha256(repr(normalised(node, module)).encode()).hexdigest()[:16]


def normalised(node, module):
    """A syntax tree as nested tuples: node types and the fields that are set, never line numbers
    nor empty fields (which Python versions print differently), with docstrings, log statements,
    the messages of raised errors and the arguments of log calls dropped, and a project module's
    name before a definition dropped (weights.groups reads as groups)."""
    if isinstance(node, list):  # a statement that only documents or says something is left out
        return tuple(normalised(n, module) for n in node
                     if not (isinstance(n, ast.Expr) and (is_docstring(n) or is_log(n.value))))
    if not isinstance(node, ast.AST):
        return node
    if isinstance(node, ast.Raise):
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        return ("Raise", normalised(exc, module))
    if is_log(node):
        return ("LogCall",)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        base = module.resolve(node.value.id)
        if base and base[0] == "module":
            return normalised(ast.Name(id=node.attr, ctx=node.ctx), module)
    fields = {f: getattr(node, f, None) for f in node._fields if f != "type_comment"}
    return (type(node).__name__, *((f, normalised(v, module)) for f, v in fields.items()
                                   if v is not None and v != []))


def is_docstring(node):
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def is_log(node):
    """A call of log(...), print(...), warnings.warn(...): it says something, computes nothing."""
    func = node.func if isinstance(node, ast.Call) else None
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    return name in LOG_CALLS


def changed_code(cached, now):
    """The names whose code differs between two {qualname: hash} maps."""
    return sorted(name for name in now.keys() | cached.keys() if now.get(name) != cached.get(name))


# ----------------------------------------------------------------------------- the weights' content

MEMO = "file-sha256.json"  # in the cache folder: {path: {"stat": [...], "sha256": ...}}


def file_sha256(file, memo_dir, log=None):
    """SHA-256 of a file's whole content, read once per (path, size, inode, mtime, ctime): any
    write to the file changes its mtime and ctime, so it is read again. log: told when a file of
    over 1 GB is read in full."""
    file = Path(file).resolve()  # the Hub's cache links files to blobs: the blob is the file
    st = file.stat()
    stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    memo_file = Path(memo_dir) / MEMO
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    known = memo.get(str(file))
    if known and known.get("stat") == stamp:
        return known["sha256"]
    t0 = time.time()
    if log and st.st_size > 1e9:
        log(f"reading {file.name} ({st.st_size / 1e9:.1f} GB) once to fingerprint its content; "
            f"later runs reuse the result while the file is unchanged")
    with open(file, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo[str(file)] = {"stat": stamp, "sha256": digest, "seconds": round(time.time() - t0, 2)}
    try:  # a temporary file renamed over the memo (not a folder: the cache's folders are its specs)
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{MEMO}.", dir=memo_file.parent)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(memo, indent=1))
        os.replace(tmp, memo_file)
    except OSError:  # a read-only cache folder: the hash is right, only not remembered
        pass
    return digest


def model_identity(folder, memo_dir, log=None):
    """The content of a checkpoint folder as one hash: config.json, tokenizer.json and every
    weights file, each by its whole content. Equal for a moved or copied folder; different after
    any change to any byte of them."""
    folder = Path(folder)
    files = ["config.json", "tokenizer.json", *sorted(f.name for f in folder.glob("*.safetensors"))]
    parts = {name: file_sha256(folder / name, memo_dir, log) for name in files}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

