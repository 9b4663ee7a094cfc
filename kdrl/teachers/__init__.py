"""Teachers: who scores the student's tokens, behind one protocol (``kdrl.teachers.base.Teacher``).

- ``local``: a frozen model on this process (also the reference, and the student scoring rows).
- ``self_teacher``: OPSD, the student reading the problem with privileged context.
- ``routed``: several teachers, one per problem chosen by a data field.
- ``cache``: Lightning OPD's offline teacher, responses and teacher log-probs stored once.
"""
from kdrl.teachers.base import Teacher
from kdrl.teachers.local import LocalTeacher, make_scorer

__all__ = ["LocalTeacher", "Teacher", "make_scorer"]
