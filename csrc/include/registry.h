// One register_<op> per operator source file (csrc/cpu/<op>.cpp); bindings.cpp calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace mrus {
void register_warp(pybind11::module_& m);
void register_jacobian(pybind11::module_& m);
void register_mi(pybind11::module_& m);
void register_sobel(pybind11::module_& m);
void register_lncc(pybind11::module_& m);
void register_regularisers(pybind11::module_& m);
}  // namespace mrus
