//! Named parameters with seeded initialisation: the backing store of every model's
//! `VarBuilder`.
//!
//! Candle's `VarMap` draws initial values from an unseeded thread RNG; this store draws
//! each parameter from its own stream, seeded by `(seed, name)`, so the same config and
//! seed give the same model on every run and thread count.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// A named set of trainable variables, created on first use by the models' builders.
#[derive(Clone, Default)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    seed: u64,
}

impl ParamStore {
    /// An empty store whose variables will be initialised from `seed`.
    pub fn new(seed: u64) -> ParamStore {
        ParamStore {
            vars: Arc::default(),
            seed,
        }
    }

    /// A builder that creates (or returns) variables in this store, in f32.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Var>> {
        // A poisoned lock means a model builder panicked: nothing sensible remains.
        self.vars.lock().expect("parameter store lock")
    }

    /// All variables, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The current values, by name (for checkpoints).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Sets every variable from `values` (names prefixed with `prefix`). Every variable
    /// must be present with its shape; the error lists all that are not.
    pub fn load(&self, values: &HashMap<String, Tensor>, prefix: &str) -> Result<()> {
        let vars = self.lock();
        let mut problems = Vec::new();
        for (name, var) in vars.iter() {
            match values.get(&format!("{prefix}{name}")) {
                None => problems.push(format!("{prefix}{name}: missing")),
                Some(t) if t.dims() != var.dims() => problems.push(format!(
                    "{prefix}{name}: shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            candle_core::bail!("{}", problems.join("; "));
        }
        for (name, var) in vars.iter() {
            let t = &values[&format!("{prefix}{name}")];
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    fn init(&self, name: &str, shape: &Shape, init: Init, device: &Device) -> Result<Tensor> {
        let n = shape.elem_count();
        let mut rng =
            pipeline::order::seeded_rng(&[b"init", &self.seed.to_le_bytes(), name.as_bytes()]);
        let values: Vec<f32> = match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Randn { mean, stdev } => {
                let normal = Normal::new(mean, stdev).map_err(candle_core::Error::wrap)?;
                (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
            }
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
            Init::Kaiming { .. } => {
                candle_core::bail!("{name}: Kaiming init is not used by mimco's models")
            }
        };
        Tensor::from_vec(values, shape.clone(), device)
    }
}

impl SimpleBackend for ParamStore {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Some(var) = self.lock().get(name) {
            if var.shape() != &s {
                candle_core::bail!("{name}: asked for shape {s:?}, exists as {:?}", var.shape());
            }
            return var.as_tensor().to_dtype(dtype);
        }
        let var = Var::from_tensor(&self.init(name, &s, h, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        self.lock().insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.lock().get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("{name}: no such parameter"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_and_load_lists_problems() {
        let dev = Device::Cpu;
        let make = |seed| {
            let store = ParamStore::new(seed);
            let vb = store.var_builder(&dev);
            let init = Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            };
            vb.get_with_hints((3, 4), "a.weight", init).unwrap();
            vb.get_with_hints(4, "a.bias", Init::Const(0.0)).unwrap();
            store
        };
        let (a, b, c) = (make(1), make(1), make(2));
        let w = |s: &ParamStore| {
            s.tensors()["a.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
        let mut values: HashMap<String, Tensor> = c.tensors().into_iter().collect();
        a.load(&values, "").unwrap();
        assert_eq!(w(&a), w(&c));
        values.remove("a.bias");
        values.insert(
            "a.weight".into(),
            Tensor::zeros((4, 3), DType::F32, &dev).unwrap(),
        );
        let err = a.load(&values, "").unwrap_err().to_string();
        assert!(
            err.contains("a.bias: missing") && err.contains("shape [4, 3]"),
            "{err}"
        );
    }
}
