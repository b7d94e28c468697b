// The state-tree encoder's common cases (csrc/state_tree.cpp; pyckpt/tree.py's ``_Encoder``).
#pragma once

#include <pybind11/pybind11.h>

namespace pyckpt {

namespace py = pybind11;

// ``py_encoder.value(state, "", 0)`` of pyckpt/tree.py's ``_Encoder``: exact built-in containers,
// scalars and tensors of type ``tensor_type``/``parameter_type`` encoded here, every other value (and
// every error) by ``py_encoder.value``/``py_encoder.mapping``. Appends to ``py_encoder.tensors`` and
// ``py_encoder.paths``. Holds the GIL throughout: it reads Python objects only.
py::object encode_state_tree(py::handle py_encoder, py::handle state, py::handle tag, py::handle tensor_type,
                             py::handle parameter_type, py::handle ordered_dict_type, int max_depth);

}  // namespace pyckpt
