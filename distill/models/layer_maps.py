"""Layer maps: which teacher layer initialises each student layer, and which teacher hidden states
each student hidden state is matched with (Shleifer & Rush 2020; Udagawa et al. 2023).

Two index conventions, kept apart by name:

* *layers* are 0-based transformer layers (``layers_to_copy``, ``layers_to_supervise``);
* *hidden indices* follow the ``hidden_states`` tuple of transformers: 0 is the embedding output and
  ``i`` the output of layer ``i - 1`` (``hidden_pairs``).
"""

from __future__ import annotations

from distill.errors import DistillError

HIDDEN_MAPS = ("copied", "supervise_forward", "last", "uniform", "uniform_consecutive", "uniform_last", "custom")


# Published "layers to copy" (Shleifer & Rush 2020, "Pre-trained Summarization Distillation"), teacher depth -> student depth -> teacher layers.
# The rule in ``_spread`` reproduces most entries; ``_COPY_EXCEPTIONS`` (derived below) holds the rest.
_PUBLISHED_COPY: dict[int, dict[int, list[int]]] = {
    12: {
        1: [0],
        2: [0, 6],
        3: [0, 6, 11],
        4: [0, 4, 8, 11],
        6: [0, 2, 4, 7, 9, 11],
        9: [0, 1, 2, 4, 5, 7, 9, 10, 11],
        12: list(range(12)),
    },
    16: {
        1: [0],
        2: [0, 15],
        3: [0, 8, 15],
        4: [0, 5, 10, 15],
        6: [0, 3, 6, 9, 12, 15],
        8: [0, 2, 4, 6, 8, 10, 12, 15],
        9: [0, 1, 3, 5, 7, 9, 11, 13, 15],
        12: [0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15],
        16: list(range(16)),
    },
    6: {1: [0], 2: [0, 5], 3: [0, 2, 5], 4: [0, 1, 3, 5], 6: list(range(6))},
}

# "Supervise forward" table (Shleifer & Rush 2020: KD's layer matching alternative).
_SUPERVISE: dict[int, dict[int, list[int]]] = {
    12: {1: [11], 2: [5, 11], 3: [3, 7, 11], 6: [1, 3, 5, 8, 10, 11]},
    16: {1: [15], 4: [4, 9, 12, 15], 8: [1, 3, 5, 7, 9, 11, 13, 15]},
    6: {1: [5], 2: [3, 5], 3: [1, 4, 5], 4: [1, 2, 4, 5]},
}


def _check_depths(n_student: int, n_teacher: int) -> None:
    for what, n in (("student", n_student), ("teacher", n_teacher)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise DistillError(f"{what} layer count must be an integer, got {n!r}")
        if n < 1:
            raise DistillError(f"{what} layer count must be at least 1, got {n}")
    if n_student > n_teacher:
        raise DistillError(
            f"a student cannot have more layers than its teacher ({n_student} > {n_teacher})"
        )


def _spread(n_student: int, n_teacher: int) -> list[int]:
    """The rule: first and last layer kept, the gaps between kept layers as equal as possible
    (each ``floor`` or ``ceil`` of (n_teacher-1)/(n_student-1)), the shorter gaps nearer the
    embeddings. Of the published entries it misses only 12->{2,3,4,6,9} and 16->3 (those come
    from ``_COPY_EXCEPTIONS``); plain rounding of i*(T-1)/(S-1) misses 7 or more."""
    if n_student == 1:
        return [0]
    if n_student == n_teacher:
        return list(range(n_teacher))
    gaps = n_student - 1
    short = (n_teacher - 1) // gaps
    return [max(i * short, n_teacher - 1 - (gaps - i) * (short + 1)) for i in range(n_student)]


# The published entries the rule does not give (computed once, so table and rule cannot drift).
_COPY_EXCEPTIONS: dict[tuple[int, int], list[int]] = {
    (t, s): layers
    for t, row in _PUBLISHED_COPY.items()
    for s, layers in row.items()
    if _spread(s, t) != layers
}


def layers_to_copy(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer (0-based) that initialises each student layer: the published table where it
    has the pair, else the even-spread rule (first and last kept)."""
    _check_depths(n_student, n_teacher)
    exception = _COPY_EXCEPTIONS.get((n_teacher, n_student))
    return list(exception) if exception is not None else _spread(n_student, n_teacher)


def layers_to_supervise(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer each student layer is matched with under the "supervise forward" scheme.

    Published pairs come from the table; equal depths give the identity and a one-layer student
    the teacher's last layer (both consistent with the table). Anything else is refused."""
    _check_depths(n_student, n_teacher)
    row = _SUPERVISE.get(n_teacher, {})
    if n_student in row:
        return list(row[n_student])
    if n_student == n_teacher:
        return list(range(n_teacher))
    if n_student == 1:
        return [n_teacher - 1]
    raise DistillError(
        f"no supervise-forward layer table for a {n_teacher}-layer teacher and a "
        f"{n_student}-layer student; use the copied-from layer matching instead"
    )


def hidden_pairs(kind: str, n_student: int, n_teacher: int, copied: list[int] | None = None,
                 teacher_layers: list[int] | None = None) -> list[tuple[int, int]]:
    """(student, teacher) hidden indices to match, for one stack.

    ``copied``: teacher layers the student's layers were copied from (``make_student`` records them;
    None for a student built at a new width). ``custom``: ``teacher_layers[i]`` is the 0-based
    teacher layer matched with student layer ``i``. Udagawa et al.'s maps (1-based, k = L_T / L_S,
    rounded when the depths do not divide):

    * last: φ(i) = L_T - L_S + i
    * uniform: φ(i) = k·i
    * uniform_consecutive: φ(i) = k(i-1)+1 ... k·i
    * uniform_last: φ(i) = {k·i, L_T - L_S + i}
    """
    _check_depths(n_student, n_teacher)
    if kind == "copied":
        if copied is None:
            raise DistillError("the 'copied' hidden map needs a student made by layer copy (distill make-student "
                               "records the map); this student was not, so choose another loss.hidden.map")
        return _from_layers(copied, n_teacher)
    if kind == "supervise_forward":
        return _from_layers(layers_to_supervise(n_student, n_teacher), n_teacher)
    if kind == "custom":
        if not teacher_layers or len(teacher_layers) != n_student:
            raise DistillError(f"loss.hidden.teacher_layers must list one teacher layer for each of the "
                               f"{n_student} student layers, got {teacher_layers}")
        return _from_layers(teacher_layers, n_teacher)
    step = lambda i: round(i * n_teacher / n_student)  # noqa: E731  (k·i, exact when the depths divide)
    last = lambda i: n_teacher - n_student + i  # noqa: E731
    pairs: list[tuple[int, int]] = []
    for i in range(1, n_student + 1):
        if kind == "last":
            targets = [last(i)]
        elif kind == "uniform":
            targets = [step(i)]
        elif kind == "uniform_consecutive":
            targets = list(range(step(i - 1) + 1, step(i) + 1))
        elif kind == "uniform_last":
            targets = sorted({step(i), last(i)})
        else:
            raise DistillError(f"unknown hidden map {kind!r}; choose one of {', '.join(HIDDEN_MAPS)}")
        pairs += [(i, j) for j in targets]
    return pairs


def _from_layers(layers: list[int], n_teacher: int) -> list[tuple[int, int]]:
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_teacher:
            raise DistillError(f"layer map {layers} indexes past the teacher's {n_teacher} layers "
                               f"(valid: 0..{n_teacher - 1})")
    return [(i + 1, j + 1) for i, j in enumerate(layers)]


def resolve_layer(index: int, depth: int, what: str) -> int:
    """A 0-based layer index, negative counting from the end (-1 = last); refused past the depth."""
    if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
        raise DistillError(f"{what} = {index} indexes past the model's {depth} layers "
                           f"(valid: 0..{depth - 1}, or -1..-{depth} from the end)")
    return index % depth
