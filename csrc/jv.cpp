#include "jv.hpp"
