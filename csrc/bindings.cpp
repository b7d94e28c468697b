// Python bindings for the engine: with state_tree.cpp (which walks Python containers, not memory),
// the only files that include pybind11.
//
// Arguments are converted to plain C++ structs while holding the GIL; every
// call that copies, hashes, compresses, waits or does I/O then releases it,
// so training threads keep running while the engine works.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <unistd.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "pyckpt/codec.h"
#include "pyckpt/copy_kernel.h"
#include "pyckpt/crc32c.h"
#include "pyckpt/cuda_api.h"
#include "pyckpt/cuda_backends.h"
#include "pyckpt/engine.h"
#include "pyckpt/errors.h"
#include "pyckpt/fingerprint.h"
#include "pyckpt/state_tree.h"
#include "pyckpt/zstd_api.h"

namespace py = pybind11;
using namespace pyckpt;

namespace {

using SavePieceT = std::tuple<uintptr_t, size_t, int>;
using SaveChunkT = std::tuple<size_t, int, std::vector<SavePieceT>>;
using ReadPieceT = std::tuple<uint64_t, uintptr_t, size_t, int>;
using ReadChunkT =
    std::tuple<size_t, uint64_t, uint64_t, uint64_t, uint32_t, int, std::vector<ReadPieceT>>;
using ResultT = std::tuple<uint64_t, uint64_t, uint64_t, uint32_t, int, uint32_t>;
// (chunk index, expected fingerprint, verify by CRC32C, expected raw CRC32C)
using ExpectT = std::tuple<size_t, uint64_t, bool, uint32_t>;

void apply_expect(std::vector<SaveChunk>& cs, const std::vector<ExpectT>& expect) {
  for (const auto& [i, fp, verify, crc] : expect) {
    PYCKPT_CHECK_ARG(i < cs.size(), "expect: chunk index " << i << " but only " << cs.size() << " chunks");
    cs[i].expect = true;
    cs[i].expect_fp = fp;
    cs[i].verify = verify;
    cs[i].expect_crc = crc;
  }
}

void apply_no_fingerprint(std::vector<SaveChunk>& cs, const std::vector<size_t>& skip) {
  for (size_t i : skip) {
    PYCKPT_CHECK_ARG(i < cs.size(), "skip_fingerprint: chunk index " << i << " but only " << cs.size()
                                                                     << " chunks");
    PYCKPT_CHECK_ARG(!cs[i].expect, "skip_fingerprint: chunk " << i << " is also expected unchanged");
    cs[i].no_fp = true;
  }
}

// A contiguous read-only view of any buffer-protocol object.
class BufferView {
 public:
  explicit BufferView(const py::object& obj) {
    if (PyObject_GetBuffer(obj.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

double timeout_arg(const std::optional<double>& t) { return t ? std::max(0.0, *t) : -1.0; }

std::vector<SaveChunk> to_save_chunks(const std::vector<SaveChunkT>& in) {
  std::vector<SaveChunk> out;
  out.reserve(in.size());
  for (const auto& [file_idx, elem_size, pieces] : in) {
    SaveChunk c{file_idx, elem_size, {}, 0, false};
    c.pieces.reserve(pieces.size());
    for (const auto& [addr, nbytes, device] : pieces) {
      c.pieces.push_back(SavePiece{addr, nbytes, device});
      c.raw_len += nbytes;
      c.on_device = c.on_device || device >= 0;
    }
    out.push_back(std::move(c));
  }
  return out;
}

std::vector<ReadChunk> to_read_chunks(const std::vector<ReadChunkT>& in) {
  std::vector<ReadChunk> out;
  out.reserve(in.size());
  for (const auto& [file_idx, offset, stored, raw, crc, codec, pieces] : in) {
    ReadChunk c{file_idx, offset, stored, raw, crc, codec, {}};
    c.pieces.reserve(pieces.size());
    for (const auto& [off, dst, nbytes, device] : pieces)
      c.pieces.push_back(ReadPiece{off, dst, nbytes, device});
    out.push_back(std::move(c));
  }
  return out;
}

std::vector<ResultT> to_tuples(const std::vector<ChunkResult>& rs) {
  std::vector<ResultT> out;
  out.reserve(rs.size());
  for (const auto& r : rs)
    out.emplace_back(r.file_offset, r.stored_len, r.raw_len, r.crc32c, r.codec, r.raw_crc32c);
  return out;
}

void translate(const Error& e) {
  switch (e.kind()) {
    case ErrorKind::Value:
      PyErr_SetString(PyExc_ValueError, e.what());
      return;
    case ErrorKind::OS:
      PyErr_SetString(PyExc_OSError, e.what());
      return;
    default:
      PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

void bind_functions(py::module_& m) {
  m.def("version", [] { return std::string(PYCKPT_VERSION); });
  m.def(
      "name_this_thread", [](const std::string& name) { name_this_thread(name.c_str()); }, py::arg("name"),
      "Name the calling OS thread (Linux keeps 15 characters; elsewhere a no-op), as top -H and perf show it.");
  m.def("cuda_compiled", &cuda::compiled);
  m.def("cuda_available", &cuda::available, py::call_guard<py::gil_scoped_release>());
  m.def(
      "_emulate_device",
      [](bool enabled, int64_t copy_delay_us, int64_t fail_copy_at, bool refuse_register) {
        cuda::emulated::configure({enabled, copy_delay_us, fail_copy_at, refuse_register});
      },
      py::arg("enabled"), py::arg("copy_delay_us") = 0, py::arg("fail_copy_at") = -1,
      py::arg("refuse_register") = false, py::call_guard<py::gil_scoped_release>(),
      "Tests only: device pieces (device >= 0) are host memory copied by an emulated in-order stream "
      "(each copy lasting >= copy_delay_us; the copy numbered fail_copy_at, from 0, fails stickily; "
      "refuse_register: the driver refuses to page-lock memory the engine mapped). "
      "Off again with enabled=False. Switch only while no save or read is running.");
  m.def("_emulated_hold_stream", &cuda::emulated::hold_stream, py::arg("stream"), py::arg("hold"),
        py::call_guard<py::gil_scoped_release>(),
        "Tests only: events recorded on this caller stream (any nonzero integer) stay pending while "
        "held, as if kernels queued there had not finished; hold=False completes them.");
  m.def("_emulated_device_stats", [] {
    const cuda::emulated::Stats st = cuda::emulated::stats();
    py::dict d;
    d["copies"] = st.copies;
    d["max_in_flight"] = st.max_in_flight;
    d["h2d_copies"] = st.h2d_copies;
    d["h2d_pageable"] = st.h2d_pageable;
    d["live_events"] = st.live_events;
    d["registered"] = st.registered;
    return d;
  });
  m.def("hw_crc32c", &crc32c_hardware);
  m.def("zstd_load", &zstd::load, py::arg("path"), py::call_guard<py::gil_scoped_release>());
  m.def("zstd_available", &zstd::available);
  m.def("zstd_version", &zstd::version);
  m.def(
      "crc32c",
      [](const py::object& data, uint32_t seed) {
        BufferView v(data);
        py::gil_scoped_release release;
        return crc32c(v.data(), v.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0);
  m.def(
      "crc32c_software",
      [](const py::object& data, uint32_t seed) {
        BufferView v(data);
        py::gil_scoped_release release;
        return crc32c_software(v.data(), v.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0);
  m.def("crc32c_kernel", &crc32c_kernel, "which CRC32C kernel large buffers use on this CPU");
  m.def(
      "crc32c_unfolded",
      [](const py::object& data, uint32_t seed) {
        BufferView v(data);
        py::gil_scoped_release release;
        return crc32c_unfolded(v.data(), v.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0, "CRC32C by the crc32 instruction only (tests compare kernels)");
  m.def(
      "copy_crc32c",
      [](uintptr_t dst, uintptr_t src, size_t nbytes, uint32_t seed, bool stream) {
        return copy_crc32c(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes, seed, stream);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("seed") = 0, py::arg("stream") = true,
      py::call_guard<py::gil_scoped_release>(),
      "copies nbytes from src to dst; CRC32C of the bytes stored (stream=False: plain stores, no streaming)");
  m.def(
      "copy_crc32c_fingerprint",
      [](uintptr_t dst, uintptr_t src, size_t nbytes) {
        uint64_t lanes[4] = {0, 0, 0, 0};
        uint32_t crc;
        {
          py::gil_scoped_release release;
          crc = copy_crc32c_fp(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes, 0, 0, lanes);
        }
        return py::make_tuple(crc, fingerprint_finish(lanes, nbytes));
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"),
      "copies nbytes from src to dst; (CRC32C, fingerprint) of the bytes stored");
  m.def(
      "crc32c_fingerprint",
      [](uintptr_t src, size_t nbytes) {
        uint64_t lanes[4] = {0, 0, 0, 0};
        uint32_t crc;
        {
          py::gil_scoped_release release;
          crc = crc32c_fp(reinterpret_cast<const void*>(src), nbytes, 0, 0, lanes);
        }
        return py::make_tuple(crc, fingerprint_finish(lanes, nbytes));
      },
      py::arg("src"), py::arg("nbytes"), "(CRC32C, fingerprint) of nbytes at src, in one read of them");
  m.def("crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"),
        "CRC32C of A||B from crc32c(A), crc32c(B) and len(B)");
  m.def(
      "crc32c_addr",
      [](uintptr_t addr, size_t nbytes, uint32_t seed) {
        return crc32c(reinterpret_cast<const void*>(addr), nbytes, seed);
      },
      py::arg("addr"), py::arg("nbytes"), py::arg("seed") = 0,
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "fingerprint",
      [](const py::object& data) {
        BufferView v(data);
        py::gil_scoped_release release;
        return fingerprint(v.data(), v.size());
      },
      py::arg("data"), "64-bit chunk-piece fingerprint (pkfp1) of a host buffer");
  m.def(
      "fingerprint_portable",
      [](const py::object& data) {
        BufferView v(data);
        py::gil_scoped_release release;
        uint64_t acc[4] = {0, 0, 0, 0};
        fingerprint_lanes_portable(v.data(), v.size(), 0, acc);
        return fingerprint_finish(acc, v.size());
      },
      py::arg("data"));
  m.def(
      "fingerprint_addr",
      [](uintptr_t addr, size_t nbytes, int device) {
        if (device < 0) return fingerprint(reinterpret_cast<const void*>(addr), nbytes);
        const void* ptr = reinterpret_cast<const void*>(addr);
        uint64_t lanes[4] = {0, 0, 0, 0};
        cuda::fingerprint_lanes(device, &ptr, &nbytes, 1, lanes, nullptr);
        return fingerprint_finish(lanes, nbytes);
      },
      py::arg("addr"), py::arg("nbytes"), py::arg("device") = -1,
      py::call_guard<py::gil_scoped_release>(),
      "fingerprint of memory at addr (device >= 0: computed on that GPU, after its pending work "
      "on the engine stream only: synchronize the caller's stream first)");
  m.def("fingerprint_simd", &fingerprint_simd);
  m.def("encode_state_tree", &encode_state_tree, py::arg("encoder"), py::arg("state"), py::arg("tag"),
        py::arg("tensor_type"), py::arg("parameter_type"), py::arg("ordered_dict_type"), py::arg("max_depth"),
        "pyckpt.tree's encoding of a state, its common cases in C++ (holds the GIL: it reads Python objects).");
  m.def("chunk_fold", &chunk_fold, py::arg("h"), py::arg("piece_fp"));
  m.attr("FP_SEED") = kFpSeed;
  m.def(
      "encode",
      [](const py::object& data, int elem_size, int level) {
        BufferView v(data);
        int codec;
        std::string stored;
        {
          py::gil_scoped_release release;
          const Encoded e = encode_chunk(v.data(), v.size(), elem_size, kCodecZstd, level,
                                         thread_scratch());
          codec = e.codec;
          stored.assign(reinterpret_cast<const char*>(e.data), e.size);
        }
        return py::make_tuple(codec, py::bytes(stored));
      },
      py::arg("data"), py::arg("elem_size"), py::arg("level") = kDefaultZstdLevel);
  m.def(
      "decode",
      [](const py::object& stored, int codec, size_t raw_len) {
        BufferView v(stored);
        std::string raw(raw_len, '\0');
        {
          py::gil_scoped_release release;
          decode_chunk(v.data(), v.size(), codec, reinterpret_cast<uint8_t*>(raw.data()), raw_len,
                       thread_scratch());
        }
        return py::bytes(raw);
      },
      py::arg("stored"), py::arg("codec"), py::arg("raw_len"));
}

void bind_save_job(py::module_& m) {
  using R = py::gil_scoped_release;
  py::class_<SaveJob, std::shared_ptr<SaveJob>>(m, "SaveJob")
      .def("num_chunks", &SaveJob::num_chunks)
      .def("chunk_captured", &SaveJob::chunk_captured, py::arg("index"))
      .def("captured_count", &SaveJob::captured_count)
      .def(
          "wait_captured",
          [](SaveJob& j, std::optional<double> t) { return j.wait_captured(timeout_arg(t)); },
          py::arg("timeout_s") = py::none(), py::call_guard<R>())
      .def(
          "wait", [](SaveJob& j, std::optional<double> t) { return j.wait(timeout_arg(t)); },
          py::arg("timeout_s") = py::none(), py::call_guard<R>())
      .def("done", &SaveJob::done)
      .def("error", &SaveJob::error)
      .def("results", [](const SaveJob& j) { return to_tuples(j.results()); })
      .def("incremental", &SaveJob::incremental,
           "(fingerprint, status) per chunk: 0 written, 1 referenced (unchanged), 2 written after a "
           "fingerprint collision was caught by CRC32C")
      .def("cancel", &SaveJob::cancel);
}

// A forked child (a fork-based DataLoader worker, say) inherits the parent's
// engines but none of their threads. Destroying one there would wake and join
// threads that do not exist: glibc's condition-variable broadcast then waits
// forever for the parent's sleeping workers, and a garbage collection in the
// child hangs it. Such a copy is left undestroyed (its memory is the child's
// copy of the parent's and goes with the child).
struct DeleteInOwnerOnly {
  pid_t owner;
  void operator()(Engine* e) const {
    if (::getpid() == owner) delete e;
  }
};

void bind_engine(py::module_& m) {
  py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
      .def(py::init([](size_t staging_bytes, size_t chunk_bytes, size_t io_threads, size_t copy_threads,
                       bool pinned, int io_nice) {
             return std::shared_ptr<Engine>(
                 new Engine(staging_bytes, chunk_bytes, io_threads, copy_threads, pinned, io_nice),
                 DeleteInOwnerOnly{::getpid()});
           }),
           py::arg("staging_bytes"),
           py::arg("chunk_bytes"), py::arg("io_threads") = 4, py::arg("copy_threads") = 2,
           py::arg("pinned") = false, py::arg("io_nice") = 0)
      .def("staging_bytes_allocated", &Engine::staging_bytes_allocated)
      .def("staging_bytes_in_use", &Engine::staging_bytes_in_use,
           "bytes of staging slabs held by saves in progress (0 when none runs)")
      .def("chunk_bytes", &Engine::chunk_bytes)
      .def("thread_shortfall", &Engine::thread_shortfall,
           "empty, or which worker pools started fewer threads than asked (the limit on threads)")
      .def(
          "save",
          [](Engine& e, std::vector<std::string> files, const std::vector<SaveChunkT>& chunks,
             int codec, int level, uintptr_t stream, int device, int64_t timeout_ms,
             int64_t delay_us, const std::vector<ExpectT>& expect, bool fp, bool constant_fp,
             bool map_files, const std::vector<size_t>& skip_fp,
             const std::vector<std::pair<int, uintptr_t>>& streams) {
            PYCKPT_CHECK_ARG(!map_files || codec == kCodecNone, "map_files needs codec none");
            std::vector<SaveChunk> cs = to_save_chunks(chunks);
            apply_expect(cs, expect);
            apply_no_fingerprint(cs, skip_fp);
            SaveOptions o;
            o.codec = codec;
            o.level = level;
            o.stream = stream;
            o.device = device;
            o.streams = streams;
            o.staging_timeout_ms = timeout_ms;
            o.write_delay_us = delay_us;
            o.fingerprint = fp;
            o.constant_fp = constant_fp;
            o.map_files = map_files;
            py::gil_scoped_release release;
            return e.save(std::move(files), std::move(cs), o);
          },
          py::arg("files"), py::arg("chunks"), py::arg("codec") = kCodecNone,
          py::arg("level") = kDefaultZstdLevel, py::arg("stream") = 0, py::arg("device") = -1,
          py::arg("staging_timeout_ms") = 60000, py::arg("write_delay_us") = 0,
          py::arg("expect") = std::vector<ExpectT>{}, py::arg("fingerprint") = false,
          py::arg("constant_fp") = false, py::arg("map_files") = false,
          py::arg("skip_fingerprint") = std::vector<size_t>{},
          py::arg("streams") = std::vector<std::pair<int, uintptr_t>>{})
      .def(
          "read",
          [](Engine& e, const std::vector<std::string>& files,
             const std::vector<ReadChunkT>& chunks, bool verify, const std::vector<int>& fds,
             bool direct) {
            std::vector<ReadChunk> cs = to_read_chunks(chunks);
            py::gil_scoped_release release;
            return e.read(files, cs, verify, fds, direct);
          },
          py::arg("files"), py::arg("chunks"), py::arg("verify") = true,
          py::arg("fds") = std::vector<int>{}, py::arg("direct") = false);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyckpt native engine: staging, CRC32C, byte-plane zstd, parallel file I/O";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      translate(e);
    }
  });
  m.attr("CODEC_NONE") = kCodecNone;
  m.attr("CODEC_ZSTD") = kCodecZstd;
  m.attr("DEFAULT_ZSTD_LEVEL") = kDefaultZstdLevel;
  m.attr("MAX_CHUNK_BYTES") = kMaxChunkBytes;
  m.attr("MAX_ZSTD_RATIO") = kMaxZstdRatio;
  bind_functions(m);
  bind_save_job(m);
  bind_engine(m);
}
