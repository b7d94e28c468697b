// The state-tree encoder's common cases in C++ (pyckpt/tree.py, ``_Encoder``).
//
// Besides bindings.cpp, the only file that touches Python objects: a transparent snapshot encodes a
// training state of thousands of tensors and their containers at every snapshot, and walking them
// in Python was a measured part of the time the training thread stops. Only exact types are
// handled here (None, bool, str and its subclasses, int, finite float, torch.Tensor/Parameter,
// dict, OrderedDict, list); any other value, and every error, goes to the Python encoder's
// ``value``, so the output (tree, tensor order, key paths) and the messages are the Python
// encoder's by construction (tests/unit/test_tree_native.py compares both on generated states).
#include "pyckpt/state_tree.h"

#include <cmath>
#include <string>

namespace pyckpt {
namespace {

py::object steal(PyObject* o) {
  if (o == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

py::object borrow(PyObject* o) { return py::reinterpret_borrow<py::object>(o); }

// The (key, value) pairs of an exact dict or OrderedDict, in the order ``d.items()`` gives them,
// each held by a strong reference while it is encoded (a callback into Python may change the dict).
class Items {
 public:
  Items(PyObject* d, bool exact_dict) : d_(borrow(d)) {
    if (!exact_dict) list_ = steal(PyMapping_Items(d));
  }

  bool str_keys() const {
    if (list_) {
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list_.ptr()); ++i)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(PyList_GET_ITEM(list_.ptr(), i), 0))) return false;
      return true;
    }
    PyObject *k, *x;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d_.ptr(), &pos, &k, &x))
      if (!PyUnicode_CheckExact(k)) return false;
    return true;
  }

  // Calls f(key, value) per pair, in order.
  template <typename F>
  void each(F&& f) const {
    if (list_) {
      py::object list = list_;
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list.ptr()); ++i) {
        PyObject* t = PyList_GET_ITEM(list.ptr(), i);
        f(borrow(PyTuple_GET_ITEM(t, 0)), borrow(PyTuple_GET_ITEM(t, 1)));
      }
      return;
    }
    PyObject *k, *x;
    Py_ssize_t pos = 0;
    while (PyDict_Next(d_.ptr(), &pos, &k, &x)) f(borrow(k), borrow(x));
  }

 private:
  py::object d_;  // held: a callback may drop the dict from its parent
  py::object list_;
};

class Encoder {
 public:
  Encoder(py::handle py_encoder, py::handle tag, py::handle tensor_type, py::handle parameter_type,
          py::handle ordered_dict_type, int max_depth)
      : py_value_(py_encoder.attr("value")),
        py_mapping_(py_encoder.attr("mapping")),
        tensors_(py_encoder.attr("tensors")),
        paths_(py_encoder.attr("paths")),
        tag_(borrow(tag.ptr())),
        tensor_type_(tensor_type.ptr()),
        parameter_type_(parameter_type.ptr()),
        ordered_dict_type_(ordered_dict_type.ptr()),
        max_depth_(max_depth),
        tensor_(py::str("tensor")),
        id_(py::str("id")),
        dict_(py::str("dict")),
        items_(py::str("items")),
        slash_(py::str("/")) {
    if (!PyList_CheckExact(tensors_.ptr()) || !PyList_CheckExact(paths_.ptr()))
      throw py::type_error("encoder.tensors and encoder.paths must be lists");
  }

  // _Encoder.value
  py::object value(py::handle v, const py::object& path, int depth) {
    if (depth > max_depth_) return py_value_(v, path, depth);  // raises, with the Python message
    PyObject* o = v.ptr();
    PyTypeObject* tp = Py_TYPE(o);
    if (o == Py_None || tp == &PyBool_Type || PyUnicode_Check(o) || tp == &PyLong_Type) return borrow(o);
    if (tp == &PyFloat_Type && std::isfinite(PyFloat_AS_DOUBLE(o))) return borrow(o);
    if (is_tensor(tp)) return add_tensor(o, path);
    if (tp == &PyDict_Type || reinterpret_cast<PyObject*>(tp) == ordered_dict_type_)
      return mapping(o, tp == &PyDict_Type, path, depth);
    if (tp == &PyList_Type) return sequence(o, path, depth);
    return py_value_(v, path, depth);  // subclasses, tuples, special values, errors: as Python encodes them
  }

 private:
  bool is_tensor(PyTypeObject* tp) const {
    PyObject* t = reinterpret_cast<PyObject*>(tp);
    return t == tensor_type_ || t == parameter_type_;
  }

  static bool scalar(PyObject* o) {  // tree.py's _SCALAR_TYPES: str, int, bool, None (exact types)
    PyTypeObject* tp = Py_TYPE(o);
    return tp == &PyUnicode_Type || tp == &PyLong_Type || tp == &PyBool_Type || o == Py_None;
  }

  // {TAG: kind, key: v}, in that order.
  py::object tagged(const py::object& kind, const py::object& key, const py::object& v) const {
    py::object out = steal(PyDict_New());
    if (PyDict_SetItem(out.ptr(), tag_.ptr(), kind.ptr()) != 0 || PyDict_SetItem(out.ptr(), key.ptr(), v.ptr()) != 0)
      throw py::error_already_set();
    return out;
  }

  py::object add_tensor(PyObject* t, const py::object& path) {
    py::object out = tagged(tensor_, id_, steal(PyLong_FromSsize_t(PyList_GET_SIZE(tensors_.ptr()))));
    if (PyList_Append(tensors_.ptr(), t) != 0 || PyList_Append(paths_.ptr(), path.ptr()) != 0)
      throw py::error_already_set();
    return out;
  }

  py::object prefix(const py::object& path) const {  // "path/", or "" at the root
    if (PyUnicode_GET_LENGTH(path.ptr()) == 0) return path;
    return steal(PyUnicode_Concat(path.ptr(), slash_.ptr()));
  }

  // _path(parent, key): "parent/key", or str(key) at the root (keys here are exact str or int).
  py::object join(const py::object& parent, PyObject* key) const {
    py::object k = PyUnicode_CheckExact(key) ? borrow(key) : steal(PyObject_Str(key));
    if (PyUnicode_GET_LENGTH(parent.ptr()) == 0) return k;
    return steal(PyUnicode_Concat(prefix(parent).ptr(), k.ptr()));
  }

  bool has_tag(PyObject* d) const {
    int r = PyDict_Contains(d, tag_.ptr());
    if (r < 0) throw py::error_already_set();
    return r == 1;
  }

  // _Encoder.child: plain scalars and tensors inline, the rest through value().
  py::object child(PyObject* x, const py::object& path, PyObject* key, int depth) {
    if (depth <= max_depth_) {
      if (scalar(x)) return borrow(x);
      if (is_tensor(Py_TYPE(x))) return add_tensor(x, join(path, key));
    }
    return value(x, join(path, key), depth);
  }

  // _Encoder.mapping, for an exact dict or OrderedDict.
  py::object mapping(PyObject* d, bool exact_dict, const py::object& path, int depth) {
    const int d1 = depth + 1;
    Items items(d, exact_dict);
    if (items.str_keys() && !has_tag(d)) {
      if (d1 > max_depth_) return py_mapping_(borrow(d), path, depth);  // raises at the first child
      return plain_mapping(items, path, d1);
    }
    bool int_or_str = true;  // keys other than int and str: Python's way (and its errors)
    items.each([&](const py::object& k, const py::object&) {
      PyTypeObject* kt = Py_TYPE(k.ptr());
      int_or_str = int_or_str && (kt == &PyLong_Type || kt == &PyUnicode_Type);
    });
    if (!int_or_str) return py_mapping_(borrow(d), path, depth);
    py::list out_items;
    items.each([&](const py::object& k, const py::object& x) {
      // An optimizer's per-parameter state inline; the rest as _Encoder.child does.
      py::object enc = plain_child(x.ptr(), d1, [&] { return join(path, k.ptr()); });
      if (!enc) enc = child(x.ptr(), path, k.ptr(), d1);
      PyObject* pair = PyList_New(2);
      if (pair == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(pair, 0, k.inc_ref().ptr());
      PyList_SET_ITEM(pair, 1, enc.release().ptr());
      if (PyList_Append(out_items.ptr(), steal(pair).ptr()) != 0) throw py::error_already_set();
    });
    return tagged(dict_, items_, out_items);
  }

  // _Encoder.plain_mapping: every key an exact str, children at depth d1 (<= the limit).
  py::object plain_mapping(const Items& items, const py::object& path, int d1) {
    py::dict out;
    py::object pre = prefix(path);
    items.each([&](const py::object& k, const py::object& x) {
      PyObject* xp = x.ptr();
      auto key_path = [&] { return steal(PyUnicode_Concat(pre.ptr(), k.ptr())); };  // made only when used
      py::object enc;
      if (scalar(xp)) {
        enc = x;
      } else if (is_tensor(Py_TYPE(xp))) {
        enc = add_tensor(xp, key_path());
      } else if (!(enc = plain_child(xp, d1, key_path))) {
        enc = value(xp, key_path(), d1);
      }
      if (PyDict_SetItem(out.ptr(), k.ptr(), enc.ptr()) != 0) throw py::error_already_set();
    });
    return std::move(out);
  }

  // A child that is an exact dict of str keys, no TAG, short of the depth limit: encoded by
  // plain_mapping at path_of(); else an empty object (the caller encodes it its own way).
  template <typename PathOf>
  py::object plain_child(PyObject* x, int d1, PathOf&& path_of) {
    if (!PyDict_CheckExact(x) || d1 >= max_depth_) return py::object();
    Items sub(x, true);
    if (!sub.str_keys() || has_tag(x)) return py::object();
    return plain_mapping(sub, path_of(), d1 + 1);
  }

  // _Encoder.sequence, for an exact list.
  py::object sequence(PyObject* v, const py::object& path, int depth) {
    const int d1 = depth + 1;
    py::object snapshot = steal(PyList_GetSlice(v, 0, PyList_GET_SIZE(v)));  // held: callbacks may change v
    PyObject* lp = snapshot.ptr();
    const Py_ssize_t n = PyList_GET_SIZE(lp);
    bool plain = d1 <= max_depth_;
    for (Py_ssize_t i = 0; plain && i < n; ++i) plain = scalar(PyList_GET_ITEM(lp, i));
    if (plain) return snapshot;  // plain scalars only (an optimizer's parameter ids): a copy
    py::list out(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      py::int_ index(i);
      out[i] = child(PyList_GET_ITEM(lp, i), path, index.ptr(), d1);
    }
    return std::move(out);
  }

  py::object py_value_, py_mapping_;
  py::object tensors_, paths_;
  py::object tag_;
  PyObject* tensor_type_;
  PyObject* parameter_type_;
  PyObject* ordered_dict_type_;
  int max_depth_;
  py::object tensor_, id_, dict_, items_, slash_;
};

}  // namespace

py::object encode_state_tree(py::handle py_encoder, py::handle state, py::handle tag, py::handle tensor_type,
                             py::handle parameter_type, py::handle ordered_dict_type, int max_depth) {
  Encoder enc(py_encoder, tag, tensor_type, parameter_type, ordered_dict_type, max_depth);
  return enc.value(state, py::str(""), 0);
}

}  // namespace pyckpt
