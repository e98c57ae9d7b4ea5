//! The change stream's hot path, native: pgoutput (logical replication protocol version 1)
//! decoding and assembly into transactions.
//!
//! `engagement_dagster/lib/pgoutput.py` is the reference and stays the specification. This
//! module decodes Begin, Insert, Update, Delete and Commit itself, the messages of every
//! change, and builds the reference's own `Change` and `Transaction` objects, so every caller
//! sees the same types. The rare messages (Relation, Type, Origin, Truncate, logical decoding
//! messages) go through the reference decoder and are applied here. Any message this module
//! cannot take as it is (malformed, out of order, an unknown relation, a binary value) is
//! handed back, with this assembler's state, to the reference assembler, whose error is the
//! one raised: one text for each error, in one place.

use std::collections::HashMap;

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

const CHANGE_FIELDS: [&str; 11] = [
    "table",
    "op",
    "new",
    "old",
    "old_is_key_only",
    "columns",
    "commit_lsn",
    "commit_ts",
    "namespace",
    "relation_oid",
    "column_types",
];
const TRANSACTION_FIELDS: [&str; 7] = [
    "xid",
    "commit_lsn",
    "end_lsn",
    "commit_ts",
    "changes",
    "origin",
    "messages",
];

/// Why the fast path stopped: the reference must judge the message, or Python raised.
enum Fault {
    Refer,
    Py(PyErr),
}

impl From<PyErr> for Fault {
    fn from(err: PyErr) -> Self {
        Fault::Py(err)
    }
}

type Step<T> = Result<T, Fault>;

/// Instances of a frozen dataclass with `__slots__`, made as `pgoutput._new_change` makes them:
/// the type's allocation, then each slot descriptor's setter; `__init__` (and its
/// `object.__setattr__` per field) never runs.
struct SlotsClass {
    class: Py<PyAny>,
    descriptors: Vec<Py<PyAny>>,
}

impl SlotsClass {
    fn new(class: &Bound<'_, PyAny>, fields: &[&str]) -> PyResult<Self> {
        let slots: Vec<String> = class.getattr("__slots__")?.extract()?;
        if slots != fields {
            return Err(PyTypeError::new_err(format!(
                "{}.__slots__ is {slots:?}, but engagement_pgoutput builds {fields:?}: rebuild it \
                 (make install) after changing the dataclass",
                class.getattr("__name__")?
            )));
        }
        let namespace = class.getattr("__dict__")?;
        let descriptors = fields
            .iter()
            .map(|field| namespace.get_item(field).map(Bound::unbind))
            .collect::<PyResult<_>>()?;
        Ok(Self {
            class: class.clone().unbind(),
            descriptors,
        })
    }

    /// One instance; `values` are borrowed, one per field in `fields` order.
    fn make(&self, py: Python<'_>, values: &[*mut ffi::PyObject]) -> PyResult<Py<PyAny>> {
        debug_assert_eq!(values.len(), self.descriptors.len());
        // SAFETY: `class` is a type object (checked by its __slots__ and __dict__ above) whose
        // slots are exactly `descriptors`; each value is a live object the caller holds.
        unsafe {
            let tp = self.class.as_ptr().cast::<ffi::PyTypeObject>();
            let alloc = (*tp).tp_alloc.unwrap_or(ffi::PyType_GenericAlloc);
            let raw = alloc(tp, 0);
            if raw.is_null() {
                return Err(PyErr::fetch(py));
            }
            let object = Bound::from_owned_ptr(py, raw);
            for (descriptor, value) in self.descriptors.iter().zip(values) {
                let descriptor = descriptor.as_ptr();
                let set = (*ffi::Py_TYPE(descriptor))
                    .tp_descr_set
                    .expect("a slot's member descriptor has a setter");
                if set(descriptor, raw, *value) != 0 {
                    return Err(PyErr::fetch(py));
                }
            }
            Ok(object.unbind())
        }
    }
}

/// Big-endian fields of one message; running past its end means the reference must judge it.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A tuple's values as a Python tuple, and whether a binary ('b') or an unchanged TOASTed
/// ('u') value is among them.
struct Values<'py> {
    tuple: Bound<'py, PyAny>,
    len: usize,
    binary: bool,
    toasted: bool,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(Fault::Refer)?;
        let bytes = self.buf.get(self.pos..end).ok_or(Fault::Refer)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take(N) is N bytes"))
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Step<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Step<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Step<i64> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// Every byte read: trailing bytes are the reference's to name.
    fn end(&self) -> Step<()> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(Fault::Refer)
        }
    }

    fn tuple<'py>(&mut self, py: Python<'py>, toast: &Py<PyAny>) -> Step<Values<'py>> {
        let len = usize::from(self.u16()?);
        let mut binary = false;
        let mut toasted = false;
        // SAFETY: a new tuple is filled once per index with a new reference before any Python
        // code can see it; an early return drops it with the items set so far (the rest NULL).
        unsafe {
            let raw = ffi::PyTuple_New(len as ffi::Py_ssize_t);
            if raw.is_null() {
                return Err(PyErr::fetch(py).into());
            }
            let tuple = Bound::from_owned_ptr(py, raw);
            for index in 0..len {
                let item = match self.u8()? {
                    b't' => {
                        let size = self.u32()? as usize;
                        let text = self.take(size)?;
                        let item = ffi::PyUnicode_DecodeUTF8(
                            text.as_ptr().cast(),
                            size as ffi::Py_ssize_t,
                            c"strict".as_ptr(),
                        );
                        if item.is_null() {
                            ffi::PyErr_Clear(); // not UTF-8: the reference names it
                            return Err(Fault::Refer);
                        }
                        item
                    }
                    b'n' => {
                        let none = ffi::Py_None();
                        ffi::Py_INCREF(none);
                        none
                    }
                    b'u' => {
                        toasted = true;
                        toast.clone_ref(py).into_ptr()
                    }
                    b'b' => {
                        binary = true;
                        let size = self.u32()? as usize;
                        let value = self.take(size)?;
                        let item = ffi::PyBytes_FromStringAndSize(
                            value.as_ptr().cast(),
                            size as ffi::Py_ssize_t,
                        );
                        if item.is_null() {
                            return Err(PyErr::fetch(py).into());
                        }
                        item
                    }
                    _ => return Err(Fault::Refer),
                };
                ffi::PyTuple_SET_ITEM(raw, index as ffi::Py_ssize_t, item);
            }
            Ok(Values {
                tuple,
                len,
                binary,
                toasted,
            })
        }
    }
}

/// What every change on one relation shares, from `pgoutput._KnownRelation.of`: the same
/// objects for every change (the stream compares `columns` and `column_types` by identity).
struct Known {
    relation: Py<PyAny>,
    columns: Py<PyAny>,
    name: Py<PyAny>,
    namespace: Py<PyAny>,
    oid: Py<PyAny>,
    column_types: Py<PyAny>,
    width: usize,
}

/// The transaction between its Begin and its Commit.
struct Open {
    final_lsn: u64,
    final_lsn_object: Py<PyAny>,
    commit_ts: Py<PyAny>,
    xid: u32,
}

/// `pgoutput.TransactionAssembler`'s interface and results; one per replication connection.
#[pyclass(module = "engagement_pgoutput")]
pub struct Assembler {
    change: SlotsClass,
    transaction: SlotsClass,
    unchanged_toast: Py<PyAny>,
    op_insert: Py<PyAny>,
    op_update: Py<PyAny>,
    op_delete: Py<PyAny>,
    op_truncate: Py<PyAny>,
    timestamp: Py<PyAny>,
    decode_message: Py<PyAny>,
    known_relation: Py<PyAny>,
    refusal: Py<PyAny>,
    relations: HashMap<u32, Known>,
    types: Py<PyDict>,
    open: Option<Open>,
    origin: Option<Py<PyAny>>,
    changes: Vec<Py<PyAny>>,
    messages: Vec<Py<PyAny>>,
    last_timestamp: Option<(i64, Py<PyAny>)>,
}

#[pymethods]
impl Assembler {
    /// `reference`: the module `engagement_dagster.lib.pgoutput`, whose types it builds.
    #[new]
    fn new(py: Python<'_>, reference: &Bound<'_, PyAny>) -> PyResult<Self> {
        let get = |name: &str| reference.getattr(name).map(Bound::unbind);
        let op = |name: &str| pyo3::types::PyString::intern(py, name).into_any().unbind();
        Ok(Self {
            change: SlotsClass::new(&reference.getattr("Change")?, &CHANGE_FIELDS)?,
            transaction: SlotsClass::new(&reference.getattr("Transaction")?, &TRANSACTION_FIELDS)?,
            unchanged_toast: get("UNCHANGED_TOAST")?,
            op_insert: op("insert"),
            op_update: op("update"),
            op_delete: op("delete"),
            op_truncate: op("truncate"),
            timestamp: get("_timestamp")?,
            decode_message: get("decode_message")?,
            known_relation: reference.getattr("_KnownRelation")?.getattr("of")?.unbind(),
            refusal: get("_refusal")?,
            relations: HashMap::new(),
            types: PyDict::new(py).unbind(),
            open: None,
            origin: None,
            changes: Vec::new(),
            messages: Vec::new(),
            last_timestamp: None,
        })
    }

    /// Decode one message; return the Transaction when it is the Commit that completes it.
    #[pyo3(signature = (payload, *, wal_lsn = None))]
    fn feed(
        &mut self,
        py: Python<'_>,
        payload: &Bound<'_, PyAny>,
        wal_lsn: Option<u64>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let bytes = match payload.cast::<PyBytes>() {
            Ok(bytes) => bytes.clone(),
            Err(_) => py
                .get_type::<PyBytes>()
                .call1((payload,))?
                .cast_into::<PyBytes>()?,
        };
        match self.step(py, &bytes, wal_lsn) {
            Ok(done) => Ok(done),
            Err(Fault::Py(err)) => Err(err),
            Err(Fault::Refer) => Err(self.refuse(py, &bytes, wal_lsn)),
        }
    }

    #[getter]
    fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// Forget a transaction cut off by a lost connection; the server resends it whole.
    fn discard_open_transaction(&mut self) {
        self.open = None;
        self.origin = None;
        self.changes.clear();
        self.messages.clear();
    }

    #[getter]
    fn relations<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let relations = PyDict::new(py);
        for (oid, known) in &self.relations {
            relations.set_item(oid, &known.relation)?;
        }
        Ok(relations)
    }

    #[getter]
    fn types<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.types.bind(py).copy()
    }
}

impl Assembler {
    fn step(
        &mut self,
        py: Python<'_>,
        payload: &Bound<'_, PyBytes>,
        wal_lsn: Option<u64>,
    ) -> Step<Option<Py<PyAny>>> {
        let buf = payload.as_bytes();
        let mut reader = Reader { buf, pos: 1 };
        match buf.first().copied().ok_or(Fault::Refer)? {
            b'I' => {
                let oid = reader.u32()?;
                if reader.u8()? != b'N' {
                    return Err(Fault::Refer);
                }
                let new = reader.tuple(py, &self.unchanged_toast)?;
                reader.end()?;
                let (open, known) = self.target(oid)?;
                text(&new, known)?;
                let change = self.new_change(
                    py,
                    open,
                    known,
                    &self.op_insert,
                    new.tuple.as_ptr(),
                    py.None().as_ptr(),
                    false_ptr(py),
                )?;
                self.changes.push(change);
                Ok(None)
            }
            b'U' => {
                let oid = reader.u32()?;
                let marker = reader.u8()?;
                let old = match marker {
                    b'K' | b'O' => {
                        let old = reader.tuple(py, &self.unchanged_toast)?;
                        if reader.u8()? != b'N' {
                            return Err(Fault::Refer);
                        }
                        Some(old)
                    }
                    b'N' => None,
                    _ => return Err(Fault::Refer),
                };
                let new = reader.tuple(py, &self.unchanged_toast)?;
                reader.end()?;
                let (open, known) = self.target(oid)?;
                text(&new, known)?;
                if let Some(old) = &old {
                    text(old, known)?;
                }
                let new_tuple = match &old {
                    // The full old row holds the value the server skipped: it did not change.
                    Some(old) if marker == b'O' && new.toasted => {
                        self.untoasted(py, &new.tuple, &old.tuple)?
                    }
                    _ => new.tuple.clone(),
                };
                let old_ptr = old
                    .as_ref()
                    .map_or(py.None().as_ptr(), |old| old.tuple.as_ptr());
                let change = self.new_change(
                    py,
                    open,
                    known,
                    &self.op_update,
                    new_tuple.as_ptr(),
                    old_ptr,
                    bool_ptr(py, marker == b'K'),
                )?;
                self.changes.push(change);
                Ok(None)
            }
            b'D' => {
                let oid = reader.u32()?;
                let marker = reader.u8()?;
                if marker != b'K' && marker != b'O' {
                    return Err(Fault::Refer);
                }
                let old = reader.tuple(py, &self.unchanged_toast)?;
                reader.end()?;
                let (open, known) = self.target(oid)?;
                text(&old, known)?;
                let change = self.new_change(
                    py,
                    open,
                    known,
                    &self.op_delete,
                    py.None().as_ptr(),
                    old.tuple.as_ptr(),
                    bool_ptr(py, marker == b'K'),
                )?;
                self.changes.push(change);
                Ok(None)
            }
            b'B' => {
                let final_lsn = reader.u64()?;
                let micros = reader.i64()?;
                let xid = reader.u32()?;
                reader.end()?;
                if self.open.is_some() {
                    return Err(Fault::Refer);
                }
                let commit_ts = self.timestamp(py, micros)?;
                let final_lsn_object = int(py, final_lsn).unbind();
                self.open = Some(Open {
                    final_lsn,
                    final_lsn_object,
                    commit_ts,
                    xid,
                });
                Ok(None)
            }
            b'C' => {
                let _flags = reader.u8()?;
                let commit_lsn = reader.u64()?;
                let end_lsn = reader.u64()?;
                let micros = reader.i64()?;
                reader.end()?;
                match &self.open {
                    Some(open) if open.final_lsn == commit_lsn => {}
                    _ => return Err(Fault::Refer),
                }
                let commit_ts = self.timestamp(py, micros)?;
                let open = self.open.take().expect("checked above");
                let changes = PyTuple::new(py, self.changes.drain(..))?;
                let messages = PyTuple::new(py, self.messages.drain(..))?;
                let origin = self.origin.take().unwrap_or_else(|| py.None());
                let transaction = self.transaction.make(
                    py,
                    &[
                        int(py, u64::from(open.xid)).as_ptr(),
                        open.final_lsn_object.as_ptr(),
                        int(py, end_lsn).as_ptr(),
                        commit_ts.as_ptr(),
                        changes.as_ptr(),
                        origin.as_ptr(),
                        messages.as_ptr(),
                    ],
                )?;
                Ok(Some(transaction))
            }
            kind => {
                self.rare(py, kind, payload, wal_lsn)?;
                Ok(None)
            }
        }
    }

    /// Relation, Type, Origin, Truncate and logical decoding messages: decoded by the
    /// reference (which raises for a malformed or unknown one), applied here.
    fn rare(
        &mut self,
        py: Python<'_>,
        kind: u8,
        payload: &Bound<'_, PyBytes>,
        wal_lsn: Option<u64>,
    ) -> Step<()> {
        let kwargs = PyDict::new(py);
        kwargs.set_item("wal_lsn", wal_lsn)?;
        let message = self
            .decode_message
            .bind(py)
            .call((payload,), Some(&kwargs))?;
        match kind {
            b'R' => {
                let known = self.known_relation.bind(py).call1((&message,))?;
                let columns = known.getattr("columns")?;
                let oid: u32 = known.getattr("oid")?.extract()?;
                self.relations.insert(
                    oid,
                    Known {
                        relation: known.getattr("relation")?.unbind(),
                        width: columns.len()?,
                        columns: columns.unbind(),
                        name: known.getattr("name")?.unbind(),
                        namespace: known.getattr("namespace")?.unbind(),
                        oid: known.getattr("oid")?.unbind(),
                        column_types: known.getattr("column_types")?.unbind(),
                    },
                );
            }
            b'Y' => {
                self.types
                    .bind(py)
                    .set_item(message.getattr("oid")?, &message)?;
            }
            b'O' => {
                if self.open.is_none() {
                    return Err(Fault::Refer);
                }
                self.origin = Some(message.getattr("name")?.unbind());
            }
            b'T' => {
                let oids: Vec<u32> = message.getattr("relation_oids")?.extract()?;
                let Some(open) = &self.open else {
                    return Err(Fault::Refer);
                };
                let mut truncated = Vec::with_capacity(oids.len());
                for oid in oids {
                    let known = self.relations.get(&oid).ok_or(Fault::Refer)?;
                    truncated.push(self.new_change(
                        py,
                        open,
                        known,
                        &self.op_truncate,
                        py.None().as_ptr(),
                        py.None().as_ptr(),
                        false_ptr(py),
                    )?);
                }
                self.changes.extend(truncated);
            }
            b'M' => {
                if !message.getattr("transactional")?.is_truthy()? || self.open.is_none() {
                    return Err(Fault::Refer);
                }
                self.messages.push(message.unbind());
            }
            _ => return Err(Fault::Refer),
        }
        Ok(())
    }

    /// One Change of the open transaction on a known relation (`new`, `old`: borrowed).
    #[allow(clippy::too_many_arguments)]
    fn new_change(
        &self,
        py: Python<'_>,
        open: &Open,
        known: &Known,
        op: &Py<PyAny>,
        new: *mut ffi::PyObject,
        old: *mut ffi::PyObject,
        old_is_key_only: *mut ffi::PyObject,
    ) -> PyResult<Py<PyAny>> {
        self.change.make(
            py,
            &[
                known.name.as_ptr(),
                op.as_ptr(),
                new,
                old,
                old_is_key_only,
                known.columns.as_ptr(),
                open.final_lsn_object.as_ptr(),
                open.commit_ts.as_ptr(),
                known.namespace.as_ptr(),
                known.oid.as_ptr(),
                known.column_types.as_ptr(),
            ],
        )
    }

    /// The open transaction and the relation a change names; either missing: the reference.
    fn target(&self, oid: u32) -> Step<(&Open, &Known)> {
        let open = self.open.as_ref().ok_or(Fault::Refer)?;
        let known = self.relations.get(&oid).ok_or(Fault::Refer)?;
        Ok((open, known))
    }

    /// `new` with each unchanged TOASTed value taken from the full old row.
    fn untoasted<'py>(
        &self,
        py: Python<'py>,
        new: &Bound<'py, PyAny>,
        old: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (new, old) = (new.cast::<PyTuple>()?, old.cast::<PyTuple>()?);
        let toast = self.unchanged_toast.bind(py);
        let values = new
            .iter()
            .zip(old.iter())
            .map(|(value, before)| if value.is(toast) { before } else { value });
        Ok(PyTuple::new(py, values)?.into_any())
    }

    /// A commit time as the reference makes it; a transaction's Begin and Commit share one.
    fn timestamp(&mut self, py: Python<'_>, micros: i64) -> PyResult<Py<PyAny>> {
        if let Some((cached, value)) = &self.last_timestamp
            && *cached == micros
        {
            return Ok(value.clone_ref(py));
        }
        let value = self.timestamp.bind(py).call1((micros,))?.unbind();
        self.last_timestamp = Some((micros, value.clone_ref(py)));
        Ok(value)
    }

    /// The reference assembler's error for a message refused here: `pgoutput._refusal` feeds
    /// it this assembler's relations and open transaction, then the message.
    fn refuse(&self, py: Python<'_>, payload: &Bound<'_, PyBytes>, wal_lsn: Option<u64>) -> PyErr {
        let explain = || -> PyResult<PyErr> {
            let begin = match &self.open {
                Some(open) => (open.final_lsn, open.commit_ts.clone_ref(py), open.xid)
                    .into_pyobject(py)?
                    .into_any(),
                None => py.None().into_bound(py),
            };
            let error =
                self.refusal
                    .bind(py)
                    .call1((self.relations(py)?, begin, payload, wal_lsn))?;
            Ok(PyErr::from_value(error))
        };
        explain().unwrap_or_else(|err| err)
    }
}

/// The reference's `_text` check: as many values as columns, and text only.
fn text(values: &Values<'_>, known: &Known) -> Step<()> {
    if values.len != known.width || values.binary {
        Err(Fault::Refer)
    } else {
        Ok(())
    }
}

fn int(py: Python<'_>, value: u64) -> Bound<'_, PyAny> {
    let Ok(value) = value.into_pyobject(py);
    value.into_any()
}

fn bool_ptr(py: Python<'_>, value: bool) -> *mut ffi::PyObject {
    pyo3::types::PyBool::new(py, value).as_ptr()
}

fn false_ptr(py: Python<'_>) -> *mut ffi::PyObject {
    bool_ptr(py, false)
}

#[pymodule]
fn engagement_pgoutput(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Assembler>()?;
    Ok(())
}
