//! [`Loader`]: a component's tensors handed out by name, as candle's `VarBuilder` does, plus
//! matrices that may stay quantized; and the recording of what a model asked for.

use super::*;

/// Tensor names and shapes in the order a model asked for them.
pub(super) type Requests = Arc<std::sync::Mutex<Vec<(String, Vec<usize>)>>>;

/// Where a [`Loader`] takes its tensors from.
#[derive(Clone)]
pub(super) enum Source {
    Weights(Weights),
    /// Names and shapes checked against the headers; placeholders handed out.
    ShapeOnly(Weights),
    /// Every request recorded (name, shape); placeholders handed out (synthetic models).
    Record(Requests),
    /// A streamed block's tensors, already on the device (names and shapes from `Weights`).
    Staged(Arc<crate::families::weights::stage::StagedMap>, Weights),
}

/// Hands out a component's tensors under a name prefix, like candle's `VarBuilder`, plus
/// matrices that may stay quantized ([`Loader::matrix`]).
#[derive(Clone)]
pub struct Loader {
    pub(super) source: Source,
    pub(super) prefix: String,
    pub(super) dtype: DType,
    pub(super) device: Device,
    /// Whether the model should keep its heavy projections as int8 (`--precision int8`): a
    /// request the modules read ([`Loader::int8`]); the loader itself hands out what it always does.
    pub(super) int8: bool,
}

/// The tensors a model asked a recording [`Loader`] for, in order.
#[derive(Clone, Default)]
pub struct Recording(Requests);

impl Recording {
    pub fn loader(&self, dtype: DType) -> Loader {
        Loader {
            source: Source::Record(self.0.clone()),
            prefix: String::new(),
            dtype,
            device: Device::Cpu,
            int8: false,
        }
    }

    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Loader {
    /// The loader for names under `prefix.s`.
    pub fn pp(&self, s: impl ToString) -> Self {
        let s = s.to_string();
        Self {
            prefix: if self.prefix.is_empty() {
                s
            } else {
                format!("{}.{s}", self.prefix)
            },
            ..self.clone()
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The same loader, asking the modules it builds for int8 projections (or not).
    pub fn with_int8(self, int8: bool) -> Self {
        Self { int8, ..self }
    }

    /// Whether the modules should convert their heavy projections to int8 after loading them
    /// (`Lin::quantize_int8`); never for placeholders (shape checks, recordings).
    pub fn int8(&self) -> bool {
        self.int8 && matches!(self.source, Source::Weights(_) | Source::Staged(..))
    }

    /// The weights behind the loader (`None` while recording).
    pub fn weights(&self) -> Option<&Weights> {
        match &self.source {
            Source::Weights(w) | Source::ShapeOnly(w) | Source::Staged(_, w) => Some(w),
            Source::Record(_) => None,
        }
    }

    /// A loader over a staged block's device tensors (see [`super::stage`]), converting them to
    /// `dtype` like a loader over `weights` would.
    pub fn staged(
        map: crate::families::weights::stage::StagedMap,
        weights: &Weights,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            source: Source::Staged(Arc::new(map), weights.clone()),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            int8: false,
        }
    }

    fn staged_tensor<'a>(
        &self,
        map: &'a crate::families::weights::stage::StagedMap,
        w: &Weights,
        path: &str,
    ) -> candle_core::Result<&'a crate::families::weights::stage::Staged> {
        match map.get(path) {
            Some(t) => Ok(t),
            None => candle_core::bail!("tensor `{}` was not staged", w.stored_name_of(path)),
        }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        self.weights().is_some_and(|w| w.contains(&self.path(name)))
    }

    fn placeholder(&self, dims: &[usize]) -> candle_core::Result<Tensor> {
        Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(dims)
    }

    /// A plain tensor of the given shape in the loader's dtype.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let path = self.path(name);
        match &self.source {
            Source::Weights(w) => {
                w.check_shape(&path, shape.dims())?;
                w.load(&path, self.dtype, &self.device)
            }
            Source::ShapeOnly(w) => {
                w.check_shape(&path, shape.dims())?;
                self.placeholder(shape.dims())
            }
            Source::Record(r) => {
                if let Ok(mut v) = r.lock() {
                    if !v.iter().any(|(n, _)| *n == path) {
                        v.push((path, shape.dims().to_vec()));
                    }
                }
                self.placeholder(shape.dims())
            }
            Source::Staged(map, w) => {
                w.check_shape(&path, shape.dims())?;
                match self.staged_tensor(map, w, &path)? {
                    crate::families::weights::stage::Staged::Dense(t) => t.to_dtype(self.dtype),
                    crate::families::weights::stage::Staged::Matrix(m) => m.dequantize(self.dtype),
                }
            }
        }
    }

    /// A matrix `[rows, cols]`, quantized if the file stores it so.
    pub fn matrix(
        &self,
        rows: usize,
        cols: usize,
        name: &str,
    ) -> candle_core::Result<StoredMatrix> {
        match &self.source {
            Source::Weights(w) => {
                let path = self.path(name);
                w.check_shape(&path, &[rows, cols])?;
                w.load_matrix(&path, self.dtype, &self.device)
            }
            Source::Staged(map, w) => {
                let path = self.path(name);
                w.check_shape(&path, &[rows, cols])?;
                Ok(match self.staged_tensor(map, w, &path)? {
                    crate::families::weights::stage::Staged::Dense(t) => {
                        StoredMatrix::Dense(t.to_dtype(self.dtype)?)
                    }
                    crate::families::weights::stage::Staged::Matrix(m) => m.clone(),
                })
            }
            _ => Ok(StoredMatrix::Dense(self.get((rows, cols), name)?)),
        }
    }
}

impl crate::ops::Lin {
    /// Loads `weight` `[out, in]` (and `bias` `[out]`) from a [`Loader`]: a weight the file stores
    /// quantized stays quantized (dequantized per product into the loader's dtype).
    pub fn load(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        ld: Loader,
    ) -> candle_core::Result<Self> {
        let weight = ld.matrix(out_dim, in_dim, "weight")?;
        let bias = bias.then(|| ld.get(out_dim, "bias")).transpose()?;
        let mut lin = Self::from_stored(weight, bias, ld.dtype(), ld.device())?;
        // LoRAs find the layer by its module path.
        lin.set_name(ld.prefix());
        Ok(lin)
    }
}
