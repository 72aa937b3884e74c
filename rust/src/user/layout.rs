//! How a fixed body layout is read and written: host byte order, fields front to back,
//! padding written as zeros and skipped on input.
//!
//! [`wire_struct!`] declares a plain layout once (its fields in wire order, with the
//! padding that follows each) and derives the struct, its `SIZE`, `to_bytes` and the
//! size-checked `from_bytes` from that single list, so a field's place, type and size
//! cannot disagree between the encoder and the decoder. The rules a payload's values must
//! follow stay hand-written next to it in `payload.rs`.

use super::{Error, Result};

pub(super) fn size_error(what: &'static str, expected: impl ToString, got: usize) -> Error {
    Error::InvalidSize {
        request: what,
        expected: expected.to_string(),
        got,
    }
}

/// A [`Reader`] over `b` if it is exactly `size` bytes, else `InvalidSize` naming `what`.
pub(super) fn exact<'a>(what: &'static str, b: &'a [u8], size: usize) -> Result<Reader<'a>> {
    if b.len() != size {
        return Err(size_error(what, size, b.len()));
    }
    Ok(Reader { rest: b })
}

/// Reads fields front to back. Callers check the length first; a read past the end
/// yields zeros instead of panicking.
pub(super) struct Reader<'a> {
    pub(super) rest: &'a [u8],
}

impl Reader<'_> {
    pub(super) fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.rest.len());
        out[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        out
    }
    pub(super) fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }
    pub(super) fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take())
    }
    pub(super) fn skip(&mut self, n: usize) {
        self.rest = self.rest.get(n..).unwrap_or(&[]);
    }
    /// One field of a layout.
    pub(super) fn field<T: Field>(&mut self) -> T {
        T::get(self)
    }
}

/// Builds a body front to back.
#[derive(Default)]
pub(super) struct Writer(Vec<u8>);

impl Writer {
    pub(super) fn with_capacity(n: usize) -> Self {
        Writer(Vec::with_capacity(n))
    }
    pub(super) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub(super) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_ne_bytes());
        self
    }
    pub(super) fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
    pub(super) fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    /// One field of a layout.
    pub(super) fn field<T: Field>(self, v: &T) -> Self {
        v.put(self)
    }
    pub(super) fn done(self) -> Vec<u8> {
        self.0
    }
}

/// A value with a fixed wire size: an integer, a byte array, or a whole [`wire_struct!`]
/// layout nested in another.
pub(super) trait Field: Sized {
    /// Bytes on the wire.
    const SIZE: usize;
    /// Appends the value.
    fn put(&self, w: Writer) -> Writer;
    /// Reads the value (zeros past the end; the caller checked the length).
    fn get(r: &mut Reader<'_>) -> Self;
}

macro_rules! int_field {
    ($($t:ty),+) => {$(
        impl Field for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(&self, w: Writer) -> Writer {
                w.bytes(&self.to_ne_bytes())
            }
            fn get(r: &mut Reader<'_>) -> Self {
                <$t>::from_ne_bytes(r.take())
            }
        }
    )+};
}

int_field!(u8, u16, u32, u64);

impl<const N: usize> Field for [u8; N] {
    const SIZE: usize = N;
    fn put(&self, w: Writer) -> Writer {
        w.bytes(self)
    }
    fn get(r: &mut Reader<'_>) -> Self {
        r.take()
    }
}

/// Declares a fixed layout once: the struct (its doc, derives and field docs), then
/// `name: "display name"` for size errors, then the fields in wire order, each with
/// `=> pad(N)` when N bytes of padding follow it; or a one-field tuple struct,
/// `pub struct Name: "display name" (type => pad(N));`. Generates `SIZE` (the fields and
/// the padding), `to_bytes`, the [`Field`] impl (so the layout can nest in another) and
/// `from_bytes`: exact size, the fields, then the optional `check: path` (a
/// `fn(&Self) -> Result<()>` holding the payload's rules), preceded by its doc lines.
macro_rules! wire_struct {
    (
        $(#[$attr:meta])*
        pub struct $name:ident: $what:literal {
            $(
                $(#[doc = $fdoc:literal])*
                $field:ident: $ty:ty $(=> pad($pad:literal))?
            ),+ $(,)?
        }
        $(#[doc = $from_doc:literal])*
        $(check: $check:path)?
    ) => {
        $(#[$attr])*
        pub struct $name {
            $(
                $(#[doc = $fdoc])*
                pub $field: $ty,
            )+
        }
        wire_struct!(@impl $name, $what, [$($field: $ty $(=> $pad)?),+],
                     [$(#[doc = $from_doc])*], [$($check)?]);
    };
    (
        $(#[$attr:meta])*
        pub struct $name:ident: $what:literal ($ty:ty $(=> pad($pad:literal))?);
        $(#[doc = $from_doc:literal])*
        $(check: $check:path)?
    ) => {
        $(#[$attr])*
        pub struct $name(pub $ty);
        wire_struct!(@impl $name, $what, [0: $ty $(=> $pad)?],
                     [$(#[doc = $from_doc])*], [$($check)?]);
    };
    (
        @impl $name:ident, $what:literal, [$($field:tt: $ty:ty $(=> $pad:literal)?),+],
        [$(#[doc = $from_doc:literal])*], [$($check:path)?]
    ) => {
        impl $name {
            /// The body's exact size on the wire.
            pub const SIZE: usize = 0 $(+ <$ty as Field>::SIZE $(+ $pad)?)+;

            /// The body as sent.
            pub fn to_bytes(&self) -> Vec<u8> {
                self.put(Writer::with_capacity(Self::SIZE)).done()
            }

            /// Decodes a received body; any other size is refused, naming the payload.
            $(#[doc = $from_doc])*
            pub fn from_bytes(b: &[u8]) -> Result<Self> {
                let mut r = exact($what, b, Self::SIZE)?;
                let value = Self::get(&mut r);
                $($check(&value)?;)?
                Ok(value)
            }
        }

        impl Field for $name {
            const SIZE: usize = $name::SIZE;
            fn put(&self, w: Writer) -> Writer {
                w $(.field(&self.$field) $(.zeros($pad))?)+
            }
            fn get(r: &mut Reader<'_>) -> Self {
                $name {
                    $($field: {
                        let v = r.field();
                        $(r.skip($pad);)?
                        v
                    },)+
                }
            }
        }
    };
}

pub(super) use wire_struct;
